"""Parity suite: every registered architecture × single-process backend × dtype on one device vs the
float64 reference.

One pytest test per (arch, backend, dtype, device); it fails with every failing record and its
repro command. Skips (unsupported backend, no device) carry the reason.
"""

from __future__ import annotations

import pytest

from moeconf.harness.engine import Selection
from moeconf.suites import matrix
from moeconf.suites.run import require_device, run_and_judge

MATRIX = matrix("parity")

pytestmark = [pytest.mark.parity, getattr(pytest.mark, MATRIX.device)]


@pytest.mark.parametrize("dtype", MATRIX.dtypes)
@pytest.mark.parametrize("backend", MATRIX.backends)
@pytest.mark.parametrize("arch", MATRIX.archs)
def test_parity(arch: str, backend: str, dtype: str) -> None:
    require_device(MATRIX.device)
    run_and_judge(Selection(archs=(arch,), backends=(backend,), dtypes=(dtype,), device=MATRIX.device))


SUITE_HYPOTHESIS_EXAMPLES = 2
SUITE_SAMPLE_CASES = ("random", "empty_expert")


@pytest.mark.parametrize("arch", MATRIX.archs)
def test_config_samples(arch: str) -> None:
    """The architecture at its class defaults, its released checkpoints' values, seeded hypothesis draws and
    invalid configs (``moeconf check --config ...``), on the reference backend (hf-eager, fp32): a block that
    ignores or hard-codes a config field is green at the tiny config and red here."""
    if "hf-eager" not in MATRIX.backends or "fp32" not in MATRIX.dtypes:
        pytest.skip("the config samples run on hf-eager, fp32 (not in MOECONF_BACKENDS / MOECONF_DTYPES)")
    if not MATRIX.configs:
        pytest.skip("MOECONF_CONFIGS=none")
    require_device(MATRIX.device)
    run_and_judge(
        Selection(
            archs=(arch,),
            backends=("hf-eager",),
            dtypes=("fp32",),
            device=MATRIX.device,
            configs=MATRIX.configs,
            # two draws per entry, plus the draws that give every routing field a second value (the coverage
            # rule): the CPU session stays within its 5 minutes; `moeconf check --config hypothesis` runs 4
            hypothesis_examples=SUITE_HYPOTHESIS_EXAMPLES,
            # the padded batch and the idle expert (exact-zero gradients); the single token and the all-on-expert-0
            # batch run at every backend and dtype at the tiny config, and every case under `moeconf check --config`
            cases=SUITE_SAMPLE_CASES,
        )
    )
