"""tinyframework's CI sessions for its MoE code (copy this file into your repository: only the
package name in ``install`` and the test path are yours).

- ``nox -s moe``: moeconf's parity checks (``tests/test_moe_conformance.py``) and the ZeRO-3 leaf /
  configure audits, on CPU, fp32 and bf16: a few minutes on 2 cores, no GPU.
- ``nox -s moe_cuda``: the parity tests on a GPU runner (``MOECONF_REQUIRE_DEVICE=1``: a runner whose
  driver is broken fails instead of skipping green).
"""

from __future__ import annotations

import nox

nox.options.sessions = ["moe"]
NO_TESTS = 5  # pytest's exit code when a marker selection leaves nothing to run


def _install(session: nox.Session) -> None:
    # Your package with its test extra (moeconf, pytest, deepspeed). For a CPU-only runner, install
    # torch from https://download.pytorch.org/whl/cpu first to avoid the CUDA wheels.
    session.install("-e", ".[test]")


@nox.session
def moe(session: nox.Session) -> None:
    """moeconf's checks of the framework's MoE code on CPU."""
    _install(session)
    session.run(
        "pytest",
        *session.posargs,
        env={"MOECONF_DEVICE": "cpu"},
        success_codes=[0, NO_TESTS],
    )


@nox.session
def moe_cuda(session: nox.Session) -> None:
    """The parity tests on CUDA (marker ``cuda``; the CPU-only audits ran in ``moe``)."""
    _install(session)
    session.run(
        "pytest",
        "-m",
        "cuda",
        *session.posargs,
        env={"MOECONF_DEVICE": "cuda", "MOECONF_REQUIRE_DEVICE": "1"},
        success_codes=[0, NO_TESTS],
    )
