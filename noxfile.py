"""nox sessions, one per hardware: thin wrappers over one pytest invocation (``_pytest``).

- ``nox -s cpu`` (default): harness tests + the parity suite on CPU, in parallel (pytest-xdist).
- ``nox -s cuda`` / ``nox -s npu``: the parity suite on that device (fp32 and bf16); on a machine
  without the device they end with "skipped: no CUDA/NPU device", or fail when
  ``MOECONF_REQUIRE_DEVICE=1`` (set that on hardware runners so a broken driver cannot pass green).

Sessions reuse the interpreter's installed packages (``--system-site-packages``): torch builds are
hardware specific (CPU wheel here, CUDA on GPU runners, the Ascend image's torch + torch_npu + CANN),
so the session must test the torch the machine has, not download another one.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["cpu"]
nox.options.reuse_existing_virtualenvs = True

VENV = ["--system-site-packages"]
PROBES = {
    "cuda": "import torch; print('yes' if torch.cuda.is_available() else 'no')",
    "npu": (
        "import importlib.util as u\n"
        "if u.find_spec('torch_npu') is None: print('no')\n"
        "else:\n import torch, torch_npu; print('yes' if torch.npu.is_available() else 'no')"
    ),
}
NO_TESTS = 5  # pytest's exit code when nothing was collected


def _install(session: nox.Session) -> None:
    session.install("-e", ".", "--no-build-isolation" if os.environ.get("MOECONF_NO_BUILD_ISOLATION") else "-q")


def _pytest(session: nox.Session, *targets: str, env: dict[str, str]) -> None:
    workers = os.environ.get("MOECONF_WORKERS", "auto")
    session.run(
        "python", "-m", "pytest", "-n", workers, "-p", "no:cacheprovider", *targets, *session.posargs,
        env=env, success_codes=[0, NO_TESTS],
    )


def _require_device(session: nox.Session, device: str) -> None:
    """Skip (or error on hardware runners) when the device is not visible to this interpreter."""
    seen = session.run("python", "-c", PROBES[device], silent=True, log=False)
    if seen is not None and str(seen).strip().endswith("yes"):
        return
    message = f"no {device.upper()} device visible (torch{' / torch_npu' if device == 'npu' else ''})"
    if os.environ.get("MOECONF_REQUIRE_DEVICE") == "1":
        session.error(f"MOECONF_REQUIRE_DEVICE=1 but {message}")
    session.skip(f"skipped: {message}")


@nox.session(venv_params=VENV)
def cpu(session: nox.Session) -> None:
    """Harness tests and the CPU parity suite (fp32 + bf16, every registered architecture)."""
    _install(session)
    _pytest(session, "tests", "moeconf/suites", env={"MOECONF_DEVICE": "cpu"})


@nox.session(venv_params=VENV)
def cuda(session: nox.Session) -> None:
    """Parity suite on CUDA, fp32 and bf16."""
    _require_device(session, "cuda")
    _install(session)
    _pytest(session, "moeconf/suites", env={"MOECONF_DEVICE": "cuda", "MOECONF_DTYPES": "fp32,bf16"})


@nox.session(venv_params=VENV)
def npu(session: nox.Session) -> None:
    """Parity suite on Ascend NPU with the image's torch + torch_npu + CANN."""
    _require_device(session, "npu")
    _install(session)
    _pytest(session, "moeconf/suites", env={"MOECONF_DEVICE": "npu", "MOECONF_DTYPES": "fp32,bf16"})
