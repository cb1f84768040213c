"""What every suite test does: run a selection through the engine and turn its records into a pytest
verdict (fail with each failing record and its repro line; skip with the reason)."""

from __future__ import annotations

import os

import pytest

from moeconf.devices import device_available
from moeconf.harness.engine import CheckResult, Selection, run_selection
from moeconf.harness.status import ENVIRONMENT, FAILING


def require_device(device: str) -> None:
    """Skip without the device, or fail when ``MOECONF_REQUIRE_DEVICE=1`` (hardware runners)."""
    if device_available(device):
        return
    if os.environ.get("MOECONF_REQUIRE_DEVICE") == "1":
        pytest.fail(f"MOECONF_REQUIRE_DEVICE=1 but no {device} device is visible", pytrace=False)
    pytest.skip(f"no {device} device")


def run_and_judge(sel: Selection) -> list[CheckResult]:
    """The selection's records; the test fails on ``fail``/``error``/``setup`` records."""
    records = [r for group in run_selection(sel) for r in group]
    bad = [r for r in records if r.status in FAILING | ENVIRONMENT]
    if bad:
        pytest.fail(
            "\n".join(f"{r.status} {r.case}/{r.check}: {r.message}\n  repro: {r.repro}" for r in bad), pytrace=False
        )
    if all(r.status == "skip" for r in records):
        pytest.skip(records[0].message if records else "nothing to check")
    return records
