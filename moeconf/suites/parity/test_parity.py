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
