"""Parity suite: every registered architecture × backend × dtype on one device vs the float64 reference.

One pytest test per (arch, backend, dtype, device); it fails with every failing record and its
repro command. Skips (unsupported backend, no device) carry the reason.
"""

from __future__ import annotations

import os

import pytest

from moeconf.devices import device_available
from moeconf.engine import Selection, run_selection
from moeconf.report import FAILING
from moeconf.suites import matrix_from_env

DEVICE, ARCHS, BACKENDS, DTYPES = matrix_from_env()

pytestmark = [pytest.mark.parity, getattr(pytest.mark, DEVICE)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_parity(arch: str, backend: str, dtype: str) -> None:
    if not device_available(DEVICE):
        if os.environ.get("MOECONF_REQUIRE_DEVICE") == "1":
            pytest.fail(f"MOECONF_REQUIRE_DEVICE=1 but no {DEVICE} device is visible")
        pytest.skip(f"no {DEVICE} device")
    sel = Selection(archs=(arch,), backends=(backend,), dtypes=(dtype,), device=DEVICE)
    records = [r for group in run_selection(sel) for r in group]
    bad = [r for r in records if r.status in FAILING]
    if bad:
        pytest.fail(
            "\n".join(f"{r.status} {r.case}/{r.check}: {r.message}\n  repro: {r.repro}" for r in bad), pytrace=False
        )
    if all(r.status == "skip" for r in records):
        pytest.skip(records[0].message if records else "nothing to check")
