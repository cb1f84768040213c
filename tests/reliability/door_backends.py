"""Backends and factories for ``test_door.py``: sleepers to interrupt, raisers to collapse, and the
shapes of ``--backend module:attr`` values the loader must accept or refuse.

``DOOR_MARKER`` (environment): a path; a sleeper creates it when its case starts, so the test knows
the run is inside the backend before it sends a signal. Rank processes inherit it, which also
marks every process of a run for the leftover check.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

from moeconf.backends import Backend, Observation, RunRequest, StepsObservation, StepsRequest
from moeconf.distributed import run_ranks
from moeconf.registry import ArchEntry

CALLS: list[str] = []
"""Names of the factories below that were called (the loader must not call the refused ones)."""


def _mark() -> None:
    marker = os.environ.get("DOOR_MARKER")
    if marker:
        Path(marker).touch()


class Sleepy:
    """A single-process backend stuck in its first case."""

    name = "door-sleepy"
    devices = ("cpu",)
    dtypes = ("fp32", "bf16")

    def supports(self, entry: ArchEntry, dtype: str, device: str) -> str | None:
        return None

    def run(self, request: RunRequest) -> Observation:
        _mark()
        time.sleep(600)
        raise AssertionError("not interrupted")


class SleepyRanks(Sleepy):
    """A multi-rank backend whose two ranks sleep (the launcher's deadline is far away)."""

    name = "door-sleepy-ranks"

    def run_session(
        self, requests: list[RunRequest], steps: StepsRequest | None
    ) -> tuple[list[Observation], StepsObservation | None]:
        run_ranks("tests.reliability.door_ranks:sleep", world_size=2, deadline_s=600, backend=None)
        raise AssertionError("not interrupted")


class RaisesImportError(Sleepy):
    """Every case raises the same ImportError: one root cause for the text report."""

    name = "door-import-error"

    def run(self, request: RunRequest) -> Observation:
        raise ImportError("No module named 'fused_moe_kernel'")


def make_sleepy() -> Backend:
    """An annotated zero-argument factory: allowed."""
    CALLS.append("make_sleepy")
    return Sleepy()


def returns_int() -> Backend:
    """Annotated as a factory but returns something else: called, then refused."""
    CALLS.append("returns_int")
    return 42  # type: ignore[return-value]


def unannotated():  # type: ignore[no-untyped-def]  # no return annotation: the point of the test
    """A function that does not declare a backend: must not be called."""
    CALLS.append("unannotated")
    return Sleepy()


def make_named(name: str) -> Backend:
    """A factory that needs an argument."""
    CALLS.append("make_named")
    s = Sleepy()
    s.name = name
    return s


def raising_factory() -> Backend:
    CALLS.append("raising_factory")
    raise RuntimeError("no GPU kernel for this build\nsecond line")


named_partial = functools.partial(make_named, "door-partial")
"""A ``functools.partial`` of an annotated factory: allowed."""


class EnvironmentBroken(Sleepy):
    """Every case hits a fault of the machine, not of the code under test."""

    name = "door-environment"

    def run(self, request: RunRequest) -> Observation:
        from moeconf.backends import EnvironmentFault

        raise EnvironmentFault("the DeepSpeed op build lock /tmp/ds/lock is stale (held by dead pid 4242)")


class Noisy(Sleepy):
    """Prints to stdout like a chatty library (Python level and straight to file descriptor 1)."""

    name = "door-noisy"

    def run(self, request: RunRequest) -> Observation:
        print("noise from print()")
        os.write(1, b"noise from fd 1\n")
        raise ImportError("No module named 'fused_moe_kernel'")
