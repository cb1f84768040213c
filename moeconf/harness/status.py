"""The one status vocabulary of moeconf's records, and where blame goes.

| status  | meaning                                                                 | exit |
|---------|-------------------------------------------------------------------------|------|
| `pass`  | the code under test agrees with the reference                           | 0    |
| `xfail` | it disagrees exactly as declared in the registry (an upstream bug)     | 0    |
| `skip`  | not applicable or not observable here (with the reason)                 | 0    |
| `fail`  | the code under test is wrong: it disagrees with the reference, or hangs | 1    |
|         | or dies on several ranks because of its own behaviour                   |      |
| `error` | the backend broke or returned something malformed (the field is named)  | 1    |
| `setup` | a fault outside the code under test: stale or unwritable extension      | 2    |
|         | cache, unwritable HOME/tmp, missing optional dependency, no free port   |      |

A run exits 1 when any record is ``fail`` or ``error``; otherwise 2 when any is ``setup`` (the
environment kept moeconf from judging the code) or when nothing was checked; otherwise 0.
"""

from __future__ import annotations

from typing import Literal

Status = Literal["pass", "fail", "xfail", "skip", "error", "setup"]
STATUSES: tuple[Status, ...] = ("pass", "fail", "xfail", "skip", "error", "setup")
FAILING: frozenset[str] = frozenset({"fail", "error"})
"""Statuses that blame the code under test (or its backend adapter): exit 1."""
ENVIRONMENT: frozenset[str] = frozenset({"setup"})
"""Statuses that blame the machine, not the code: exit 2 when nothing failed."""
SEVERITY: dict[str, int] = {s: i for i, s in enumerate(("error", "fail", "setup", "xfail", "pass", "skip"))}
"""Worst first: how a table cell summarises several records."""


def declared_verdict(
    passed: bool | None, declared: str | None, reason: str = "", strict: bool = True
) -> tuple[Status, str]:
    """Status of a check outcome under a registry declaration, and the message prefix.

    ``declared`` is None (nothing declared), ``"xfail"`` or ``"skip"``. An xfail is strict: a check
    that passes although declared to fail is a ``fail`` (the declaration is stale) — except at a
    drawn config sample (``strict=False``: ``default``, ``hypothesis``), where the bug may be out of
    reach (renormalising k = E softmax weights changes nothing): there it is a ``pass`` that says so.
    """
    if declared == "skip":
        return "skip", f"declared skip: {reason}"
    if passed is None:
        return "skip", ""
    if declared == "xfail":
        if passed and not strict:
            return "pass", f"(declared xfail not reached at this config: {reason})"
        if passed:
            return "fail", f"passed, but is declared xfail: {reason}."
        return "xfail", f"failed as declared: {reason}."
    return ("pass" if passed else "fail"), ""
