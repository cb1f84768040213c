"""Correctness first: a backend is timed only after it passes the parity checks at the tiny config.

The checks are the gate's own (``moeconf.harness.engine.run_selection``), for the figure's (arch,
backend, dtype, device): every case, every applicable check. A ``fail`` or ``error`` record makes the
backend ``not_timed`` with the failing checks named; a ``setup`` record (a fault of the machine) makes
it ``error``; a backend whose every record is a skip does not support the architecture here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch.utils.benchmark.utils.common import set_torch_threads

from moeconf.harness.engine import CheckResult, Selection, run_selection
from moeconf.harness.status import ENVIRONMENT, FAILING

GateStatus = Literal["passed", "failed", "setup", "unsupported"]


@dataclass(frozen=True)
class GateVerdict:
    status: GateStatus
    message: str = ""
    failing_checks: tuple[str, ...] = ()


_VERDICTS: dict[tuple[str, str, str, str], GateVerdict] = {}


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def verdict_of(records: list[CheckResult]) -> GateVerdict:
    """The gate's verdict on one (arch, backend, dtype, device)'s parity records."""
    failing = [r for r in records if r.status in FAILING]
    if failing:
        checks = tuple(dict.fromkeys(r.check for r in failing))
        first = failing[0]
        return GateVerdict(
            "failed",
            f"failed parity at the tiny config: {', '.join(checks)} (first: {first.status} case={first.case} "
            f"check={first.check}: {_first_line(first.message)}; repro: {first.repro})",
            checks,
        )
    setup = [r for r in records if r.status in ENVIRONMENT]
    if setup:
        return GateVerdict("setup", f"parity could not run (environment): {_first_line(setup[0].message)}")
    if all(r.status == "skip" for r in records):
        reason = _first_line(records[0].message) if records else "no parity record"
        return GateVerdict("unsupported", reason)
    return GateVerdict("passed")


def parity_gate(arch: str, backend: str, dtype: str, device: str, program: str = "moeconf") -> GateVerdict:
    """Run (once per process) the parity checks of one (arch, backend, dtype, device).

    NOTE: one thread, as ``moeconf check`` runs them: the tiny shapes are dispatch-bound and the timed
    figures set their own thread count afterwards.
    """
    key = (arch, backend, dtype, device)
    if key not in _VERDICTS:
        selection = Selection(archs=(arch,), backends=(backend,), dtypes=(dtype,), device=device, program=program)
        with set_torch_threads(1):
            records = [r for group in run_selection(selection) for r in group]
        _VERDICTS[key] = verdict_of(records)
    return _VERDICTS[key]
