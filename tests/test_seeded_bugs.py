"""Proof that every check can fail: seeded bugs must turn the intended check red."""

from __future__ import annotations

import pytest

from moeconf.harness.engine import CheckResult, Selection, run_selection
from tests.seeded import SEEDED


def run(arch: str, backend: str, dtype: str = "fp32") -> list[CheckResult]:
    return [r for group in run_selection(Selection(archs=(arch,), backends=(backend,), dtypes=(dtype,))) for r in group]


def red(records: list[CheckResult]) -> set[str]:
    return {r.check for r in records if r.status in ("fail", "error")}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("bug", sorted(SEEDED))
def test_seeded_bug_is_reported_under_the_right_check(bug: str, dtype: str) -> None:
    arch, must_fail, must_pass = SEEDED[bug]
    records = run(arch, f"tests.seeded:{bug}", dtype)
    failing = red(records)
    assert must_fail <= failing, f"{bug}: expected {must_fail} red, got {failing}"
    assert not (must_pass & failing), f"{bug}: {must_pass & failing} went red too (not specific)"
    for r in records:
        if r.status == "fail":
            assert r.message and f"--backend tests.seeded:{bug}" in r.repro


def test_the_unbroken_backend_passes_the_same_selection() -> None:
    """Control: the seeded archs are green without the bug, so red above means the bug."""
    for arch in sorted({arch for arch, _, _ in SEEDED.values()}):
        assert red(run(arch, "hf-eager")) == set()
