"""Shared by the seeded-bug tests: run a selection, name the checks that went red, and assert that a
seeded bug is caught by the checks it should be caught by and by no other."""

from __future__ import annotations

from moeconf.backends import Backend
from moeconf.harness.engine import CheckResult, Selection, run_arch, run_selection
from moeconf.registry import ArchEntry


def records_of(arch: str, backend: str, dtype: str = "fp32") -> list[CheckResult]:
    """Every record of one (arch, backend name, dtype), through the engine as the CLI runs it."""
    selection = Selection(archs=(arch,), backends=(backend,), dtypes=(dtype,))
    return [r for group in run_selection(selection) for r in group]


def judged_records(entry: ArchEntry, backend: Backend, dtype: str = "fp32") -> list[CheckResult]:
    """Every record of ``entry`` (which need not be registered) on a backend object; none may be an
    error: a seeded bug must be *judged* red, not crash the run."""
    sel = Selection(archs=(entry.model_type,), backends=(backend.name,), dtypes=(dtype,))
    records = [r for group in run_arch(sel, entry, {backend.name: backend}, dtype) for r in group]
    errors = [f"{r.case} {r.check}: {r.message}" for r in records if r.status in ("error", "setup")]
    assert records and not errors, errors[:3]
    return records


def red(records: list[CheckResult]) -> set[str]:
    """The checks with a failing or erroring record."""
    return {r.check for r in records if r.status in ("fail", "error")}


def assert_caught(bug: str, records: list[CheckResult], must_fail: set[str], must_pass: set[str]) -> None:
    """``bug`` turned every check of ``must_fail`` red and none of ``must_pass``."""
    failing = red(records)
    assert must_fail <= failing, f"{bug}: expected {must_fail} red, got {failing}"
    assert not (must_pass & failing), f"{bug}: {must_pass & failing} went red too (not specific)"


__all__ = ["assert_caught", "judged_records", "records_of", "red"]
