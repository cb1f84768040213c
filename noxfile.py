"""nox sessions, one per hardware: thin wrappers over one pytest invocation (``_pytest``).

- ``nox -s cpu`` (default): harness tests + the parity suite on CPU, in parallel (pytest-xdist).
- ``nox -s cuda`` / ``nox -s npu``: the parity suite on that device (fp32 and bf16); on a machine
  without the device they end with "skipped: no CUDA/NPU device", or fail when
  ``MOECONF_REQUIRE_DEVICE=1`` (set that on hardware runners so a broken driver cannot pass green).

The hardware sessions run in the interpreter that runs nox (``venv_backend="none"``): torch builds
are hardware specific (the CPU wheel here, CUDA on GPU runners, the Ascend image's torch + torch_npu +
CANN), so a session must test the torch the machine has, never download another one.
"""

from __future__ import annotations

import os
import subprocess
import sys

import nox

nox.options.sessions = ["cpu"]

PYTHON = sys.executable
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
    """Make this checkout's moeconf importable (editable), without touching its dependencies."""
    here = os.path.dirname(os.path.abspath(__file__))
    probe = "import moeconf, os, sys; sys.exit(os.path.dirname(os.path.dirname(moeconf.__file__)) != sys.argv[1])"
    if subprocess.run([PYTHON, "-c", probe, here], capture_output=True).returncode != 0:
        session.run(PYTHON, "-m", "pip", "install", "-q", "--no-deps", "-e", here, external=True)


def _pytest(session: nox.Session, *targets: str, env: dict[str, str]) -> None:
    workers = os.environ.get("MOECONF_WORKERS", "auto")
    session.run(
        PYTHON,
        "-m",
        "pytest",
        "-n",
        workers,
        "-p",
        "no:cacheprovider",
        *targets,
        *session.posargs,
        env=env,
        success_codes=[0, NO_TESTS],
        external=True,
    )


def _require_device(session: nox.Session, device: str) -> None:
    """Skip (or error on hardware runners) when the device is not visible to this interpreter."""
    seen = subprocess.run([PYTHON, "-c", PROBES[device]], capture_output=True, text=True).stdout.strip()
    if seen.endswith("yes"):
        return
    message = f"no {device.upper()} device visible (torch{' / torch_npu' if device == 'npu' else ''})"
    if os.environ.get("MOECONF_REQUIRE_DEVICE") == "1":
        session.error(f"MOECONF_REQUIRE_DEVICE=1 but {message}")
    session.skip(message)


@nox.session(venv_backend="none")
def cpu(session: nox.Session) -> None:
    """Harness tests and the CPU parity suite (fp32 + bf16, every registered architecture)."""
    _install(session)
    # tests/partition runs in the partition session, after DeepSpeed's op is built up front.
    _pytest(session, "tests", "moeconf/suites", "--ignore=tests/partition", env={"MOECONF_DEVICE": "cpu"})


def _device_parity(session: nox.Session, device: str, backends: str) -> None:
    """The parity suite on an accelerator, fp32 and bf16, after the device probe."""
    _require_device(session, device)
    _install(session)
    env = {"MOECONF_DEVICE": device, "MOECONF_DTYPES": "fp32,bf16", "MOECONF_BACKENDS": backends}
    _pytest(session, "moeconf/suites", env=env)


@nox.session(venv_backend="none")
def cuda(session: nox.Session) -> None:
    """Parity suite on CUDA, fp32 and bf16."""
    _device_parity(session, "cuda", "hf-eager,hf-grouped-mm,hf-batched-mm,grouped-mm")


@nox.session(venv_backend="none")
def npu(session: nox.Session) -> None:
    """Parity suite on Ascend NPU with the image's torch + torch_npu + CANN."""
    _device_parity(session, "npu", "hf-eager,npu-gmm")


PARTITION_TRANSFORMERS = {"5": "transformers>=5.24,<6", "4.57": "transformers>=4.57,<4.58"}


@nox.session(venv_params=["--system-site-packages"])
@nox.parametrize("transformers", list(PARTITION_TRANSFORMERS))
def partition(session: nox.Session, transformers: str) -> None:
    """Multi-rank suite (DeepSpeed ZeRO-2/3, FSDP2, gloo) under transformers 5.x and 4.57.x.

    A virtualenv per transformers version that still sees the machine's torch (system site packages).
    """
    import torch

    session.install(
        f"torch=={torch.__version__.split('+')[0]}", PARTITION_TRANSFORMERS[transformers], "deepspeed>=0.16,<0.20"
    )
    session.install("--no-deps", "-e", ".")
    # Build DeepSpeed's CPU comm op once, up front, with progress and a stale-lock check.
    session.run(
        "python",
        "-c",
        "from moeconf.distributed.deepspeed_env import ensure_deepspeed_cpu_ops as b; b()",
        env={"DS_ACCELERATOR": "cpu"},
    )
    workers = os.environ.get("MOECONF_WORKERS", "2")
    session.run(
        "python",
        "-m",
        "pytest",
        "-n",
        workers,
        "-p",
        "no:cacheprovider",
        "tests/partition",
        *session.posargs,
        success_codes=[0, NO_TESTS],
    )
