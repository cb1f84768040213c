"""The engine's handling of multi-rank backends, without launching ranks: a hang or a dead rank turns
every record of the launch red (``fail``, with the full report on ``no_hang``); a broken backend is an
``error``."""

from __future__ import annotations

import time

from moeconf.backends import Observation
from moeconf.backends.base import RankFailure
from moeconf.harness.engine import Selection, run_arch
from moeconf.harness.partition_checks import STEPS_CASE
from moeconf.registry import REGISTRY


class FakeMultiRank:
    name = "fake-multirank"
    devices = ("cpu",)
    dtypes = ("fp32",)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def supports(self, entry, dtype, device):  # type: ignore[no-untyped-def]
        return None

    def run(self, request) -> Observation:  # type: ignore[no-untyped-def]
        raise self.exc

    def run_session(self, requests, steps):  # type: ignore[no-untyped-def]
        raise self.exc


def _records(exc: Exception) -> list:
    sel = Selection(archs=("mixtral",), backends=("fake",), cases=("random", STEPS_CASE))
    return [r for g in run_arch(sel, REGISTRY["mixtral"], {"fake": FakeMultiRank(exc)}, "fp32") for r in g]


def test_a_hang_fails_every_record_and_keeps_the_stacks() -> None:
    report = "--- rank 0: ...stack...\n--- rank 1: ...stack..."
    records = _records(RankFailure("hang", "hang: ranks [0, 1] still running after 45 s", report))
    assert records and {r.status for r in records} == {"fail"}
    assert {r.case for r in records} == {"random", STEPS_CASE}
    no_hang = next(r for r in records if r.check == "no_hang")
    assert "--- rank 0" in no_hang.message and "--- rank 1" in no_hang.message
    # the launch's evidence once in the whole report; every other record says one line
    assert [r.check for r in records if "--- rank 0" in r.message] == ["no_hang"]
    assert all("\n" not in r.message for r in records if r is not no_hang)


def test_a_broken_backend_is_an_error_not_a_failed_check() -> None:
    records = _records(RuntimeError("import failed"))
    assert {r.status for r in records} == {"error"}


class StuckSession(FakeMultiRank):
    """A launcher that never comes back (its own watchdog broken): the engine's deadline still ends it."""

    def run_session(self, requests, steps):  # type: ignore[no-untyped-def]
        while True:
            time.sleep(0.01)


def test_a_session_past_its_deadline_is_an_error_with_the_stack() -> None:
    sel = Selection(archs=("mixtral",), backends=("fake",), cases=("random", STEPS_CASE), timeout_s=0.2)
    backend = StuckSession(RuntimeError("unused"))
    records = [r for g in run_arch(sel, REGISTRY["mixtral"], {"fake": backend}, "fp32") for r in g]
    assert {r.case for r in records} == {"random", STEPS_CASE}
    assert {r.status for r in records} == {"error"}
    # one deadline per case of the launch: (1 case + the steps) x 0.2 s
    assert all(r.message.startswith("backend timed out: did not return within 0.4 s") for r in records)
    no_hang = next(r for r in records if r.check == "no_hang")
    assert "in run_session" in no_hang.message  # the stack, once per case, on no_hang for the steps
    assert all("\n" not in r.message for r in records if r.check not in ("no_hang", "routing"))
