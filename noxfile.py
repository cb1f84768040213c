"""nox sessions, one per suite and hardware: thin wrappers over one pytest invocation (``_pytest``),
selecting tests by marker (``parity``, ``partition``, ``perf``; see ``pyproject.toml``).

- ``nox -s cpu`` (default): harness tests + the parity suite on CPU, in parallel (pytest-xdist).
- ``nox -s partition``: the multi-rank suite, once per transformers version.
- ``nox -s cuda`` / ``nox -s npu``: the parity suite on that device (fp32 and bf16); on a machine
  without the device they end with "skipped: no CUDA/NPU device", or fail when
  ``MOECONF_REQUIRE_DEVICE=1`` (set that on hardware runners so a broken driver cannot pass green).

The cpu and hardware sessions run in the interpreter that runs nox (``venv_backend="none"``): torch
builds are hardware specific (the CPU wheel here, CUDA on GPU runners, the Ascend image's torch +
torch_npu + CANN), so a session must test the torch the machine has, never download another one.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import nox

nox.options.sessions = ["cpu"]

PYTHON = sys.executable
HERE = Path(__file__).resolve().parent
PROBES = {
    "cuda": "import torch; print('yes' if torch.cuda.is_available() else 'no')",
    "npu": (
        "import importlib.util as u\n"
        "if u.find_spec('torch_npu') is None: print('no')\n"
        "else:\n import torch, torch_npu; print('yes' if torch.npu.is_available() else 'no')"
    ),
}
COUNT_PROBE = "from moeconf.devices import device_count; import sys; print(device_count(sys.argv[1]))"
MIN_PARTITION_DEVICES = 2
NO_TESTS = 5  # pytest's exit code when nothing was collected
TEST_PATHS = ("tests", "moeconf/suites")


def _install(session: nox.Session) -> None:
    """Make this checkout's moeconf importable (editable), without touching its dependencies."""
    probe = "import moeconf, os, sys; sys.exit(os.path.dirname(os.path.dirname(moeconf.__file__)) != sys.argv[1])"
    if subprocess.run([PYTHON, "-c", probe, str(HERE)], capture_output=True).returncode != 0:
        session.run(PYTHON, "-m", "pip", "install", "-q", "--no-deps", "-e", str(HERE), external=True)


def _pytest(
    session: nox.Session,
    marker: str,
    env: dict[str, str],
    python: str = PYTHON,
    workers: str = "auto",
    extra: tuple[str, ...] = (),
) -> None:
    session.run(
        python,
        "-m",
        "pytest",
        "-n",
        os.environ.get("MOECONF_WORKERS", workers),
        *extra,
        "-p",
        "no:cacheprovider",
        "-m",
        marker,
        *TEST_PATHS,
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


@nox.session(venv_backend="none", tags=["ci"])
def cpu(session: nox.Session) -> None:
    """Harness tests and the CPU parity suite (fp32 + bf16, every registered architecture)."""
    _install(session)
    # The multi-rank tests run in the partition session, after DeepSpeed's op is built up front.
    _pytest(session, "not partition and not perf", env={"MOECONF_DEVICE": "cpu"})
    _example_tests(session)


EXAMPLE = HERE / "examples" / "moe_framework"


def _example_tests(session: nox.Session) -> None:
    """The downstream example's own tests, as its CI runs them: from its root (its pytest settings,
    the plugin, ``tinyframework`` importable through ``python -m``), not installed into this
    environment (its entry points would add its architectures to every ``moeconf check`` here)."""
    with session.chdir(EXAMPLE):
        session.run(
            PYTHON,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            env={"MOECONF_DEVICE": "cpu"},
            success_codes=[0, NO_TESTS],
            external=True,
        )


def _device_parity(session: nox.Session, device: str) -> None:
    """The parity suite on an accelerator, fp32 and bf16, after the device probe; the backends are
    the suite's computed list for that device. Then the partition suite, one rank per device."""
    _require_device(session, device)
    _install(session)
    _pytest(session, "parity", env={"MOECONF_DEVICE": device, "MOECONF_DTYPES": "fp32,bf16"})
    _device_partition(session, device)


def _device_partition(session: nox.Session, device: str) -> None:
    """The partition suite on the machine's devices (NCCL on CUDA, HCCL on NPU; the collective
    timeout and moeconf's watchdog turn NCCL's hang-instead-of-raise into a ``no_hang`` failure with
    every rank's stack). Skipped, with the reason, below 2 devices. One pytest worker: every test's
    ranks take all the devices."""
    count = int(subprocess.run([PYTHON, "-c", COUNT_PROBE, device], capture_output=True, text=True).stdout.strip() or 0)
    if count < MIN_PARTITION_DEVICES:
        session.log(
            f"partition suite skipped: {count} {device} device(s), the multi-rank backends need {MIN_PARTITION_DEVICES}"
        )
        return
    # the suite's tests carry the device's marker; tests/partition's launcher tests are CPU-only
    _pytest(session, f"partition and {device}", env={"MOECONF_DEVICE": device}, workers="0")


@nox.session(venv_backend="none")
def cuda(session: nox.Session) -> None:
    """Parity suite on CUDA, fp32 and bf16; the partition suite on >= 2 GPUs (NCCL)."""
    _device_parity(session, "cuda")


@nox.session(venv_backend="none")
def npu(session: nox.Session) -> None:
    """Parity suite on Ascend NPU with the image's torch + torch_npu + CANN; the partition suite on
    >= 2 NPUs (HCCL)."""
    _device_parity(session, "npu")


PARTITION_TRANSFORMERS = {"5": "transformers>=5.24,<6", "4.57": "transformers>=4.57,<4.58"}


def _share_user_packages(session: nox.Session) -> None:
    """Let the session's virtualenv see the packages of the interpreter that runs nox.

    NOTE: why not ``--system-site-packages``: that exposes the *base* interpreter's packages, not the
    virtualenv the user installed moeconf into, so a fresh ``python3 -m venv`` user would get no
    torch, pytest or pytest-xdist there. A ``.pth`` line runs ``site.addsitedir`` on the user's
    site-packages instead: it is appended after the session's own site-packages, so what the session
    installs (the transformers version under test, DeepSpeed) wins and everything else (torch,
    pytest, xdist, hypothesis) is the user's, not a second download.
    """
    user_dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    venv_purelib = session.run(
        "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", silent=True
    ).strip()
    lines = [f"import site; site.addsitedir({d!r})" for d in dict.fromkeys(user_dirs) if os.path.isdir(d)]
    Path(venv_purelib, "_moeconf_user_site.pth").write_text("\n".join(lines) + "\n")


@nox.session(tags=["ci"])
@nox.parametrize("transformers", list(PARTITION_TRANSFORMERS))
def partition(session: nox.Session, transformers: str) -> None:
    """Multi-rank suite (DeepSpeed ZeRO-2/3, FSDP2, gloo) under transformers 5.x and 4.57.x."""
    _share_user_packages(session)
    session.install(PARTITION_TRANSFORMERS[transformers], "deepspeed>=0.16,<0.20")
    session.install("--no-deps", "-e", str(HERE))
    # Build DeepSpeed's CPU comm op once, up front (what `moeconf check` does before its first launch
    # too): a writable cache, a killed build's lock removed, a live build waited for.
    session.run("python", "-m", "moeconf.distributed.deepspeed_env", env={"DS_ACCELERATOR": "cpu"})
    # one backend's tests per worker at a time (xdist groups): each worker keeps few rank pools up
    _pytest(session, "partition", env={}, python="python", workers="2", extra=("--dist", "loadgroup"))


# --- transformers releases ----------------------------------------------------------------------------
VERSION_MATRIX = {
    "4.55": "transformers>=4.55,<4.56",
    "4.57": "transformers>=4.57,<4.58",
    "5.0": "transformers>=5.0,<5.1",
    "5.6": "transformers>=5.6,<5.7",
    "5.12": "transformers>=5.12,<5.13",
    "latest": "transformers>=5.24,<6",
}
"""The releases users run: the oldest admitted, the 4.x line, the first 5.x, frameworks' ceiling
(LLaMA-Factory 0.9.5 pins <= 5.6), a mid-5.x and the latest."""
CI_RELEASES = ("4.55", "5.6")
"""Run by CI (``nox -t ci``) besides the latest, which the cpu session covers."""


@nox.session(tags=["versions"])
@nox.parametrize("transformers", [nox.param(v, tags=["ci"] if v in CI_RELEASES else []) for v in VERSION_MATRIX])
def versions(session: nox.Session, transformers: str) -> None:
    """The parity suite (every registered architecture, the single-process backends, fp32 + bf16)
    under one transformers release; an architecture the release lacks is skipped with the release
    that added it, and an upstream bug of that release is a declared xfail/skip with its range."""
    _share_user_packages(session)
    session.install(VERSION_MATRIX[transformers])
    session.install("--no-deps", "-e", str(HERE))
    session.run("python", "-c", "import transformers; print('transformers', transformers.__version__)")
    # The config samples the default `moeconf check` runs (tiny and published), not the drawn ones: a release
    # is judged as its users run the gate; the latest runs every kind in the cpu session.
    env = {"MOECONF_DEVICE": "cpu", "MOECONF_CONFIGS": "published"}
    _pytest(session, "parity", env=env, python="python", workers="2")


# --- performance ------------------------------------------------------------------------------------
PERF_DIR = "perf-results"


def _perf(session: nox.Session, device: str) -> None:
    """The perf suite (marker ``perf``): the bench engine over the device's quick preset set, JSON
    reports and PNG plots in ``$MOECONF_PERF_DIR`` (default ``perf-results/``). Serial (``-n 0``): two
    timed workers would share the cores they measure."""
    out = os.environ.get("MOECONF_PERF_DIR", str(HERE / PERF_DIR))
    env = {"MOECONF_DEVICE": device, "MOECONF_PERF_DIR": out}
    if device == "cpu":
        # One fixed intra-op thread unless told otherwise: stable on shared CI cores, and reported per row.
        env["MOECONF_THREADS"] = os.environ.get("MOECONF_THREADS", "1")
    _pytest(session, "perf", env=env, workers="0")
    session.log(f"perf reports and plots: {out}")


@nox.session(venv_backend="none")
def perf(session: nox.Session) -> None:
    """Perf suite on CPU: quick preset set, every figure timed, JSON + PNG plots in perf-results/.

    Tiny blocks of four router families, checkpoint presets at 1/16 width, 2-rank training steps; no
    speed is asserted; a few minutes on 2 cores."""
    _install(session)
    _perf(session, "cpu")


@nox.session(venv_backend="none")
def perf_cuda(session: nox.Session) -> None:
    """Perf suite on CUDA (checkpoint presets at full size, bf16)."""
    _require_device(session, "cuda")
    _install(session)
    _perf(session, "cuda")


@nox.session(venv_backend="none")
def perf_npu(session: nox.Session) -> None:
    """Perf suite on Ascend NPU (hf-eager and npu-gmm at checkpoint sizes, bf16)."""
    _require_device(session, "npu")
    _install(session)
    _perf(session, "npu")


# --- clients ----------------------------------------------------------------------------------------
CLIENT_RESULTS = "client-results"


@nox.session
@nox.parametrize("transformers", list(PARTITION_TRANSFORMERS))
def client_llamafactory(session: nox.Session, transformers: str) -> None:
    """LLaMA-Factory 0.9.5 as a real client (clients/llamafactory/README.md): its ZeRO-3 leaf function,
    its configure function and its NPU fused MoE forward (on moeconf's torch_npu emulator) under moeconf,
    per transformers version. Report: ``client-results/llamafactory/<transformers version>/``
    (``$MOECONF_CLIENT_RESULTS`` overrides the base). Succeeds when the report was written, whatever it
    found (the findings are LLaMA-Factory's; their count is printed); fails when something could not be
    judged or the runner broke."""
    _share_user_packages(session)
    session.install(PARTITION_TRANSFORMERS[transformers])
    session.install("--no-deps", "-e", str(HERE))
    # The wheel only (`pip download llamafactory==0.9.5 --no-deps`), kept in the session's virtualenv.
    wheels = Path(session.virtualenv.location, "llamafactory")
    version = session.run(
        "python", "-c", "from importlib.metadata import version; print(version('transformers'))", silent=True
    ).strip()
    out = Path(os.environ.get("MOECONF_CLIENT_RESULTS", str(HERE / CLIENT_RESULTS)), "llamafactory", version)
    session.run(
        "python",
        "-m",
        "clients.llamafactory.run",
        "--wheel-dir",
        str(wheels),
        "--out",
        str(out),
        env={"DS_ACCELERATOR": "cpu"},
    )
