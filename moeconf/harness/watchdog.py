"""A deadline for single-process backend calls, with the stack of where a stuck call was.

Design choice (why a thread, not a worker subprocess): a backend is an arbitrary Python object handed
to moeconf (a patched block, a kernel binding, a closure over a framework's state); it need not be
picklable or importable by name in a fresh interpreter, and a worker per case would pay an import of
torch + transformers (seconds) on every one of thousands of tiny cases. So the call runs in a daemon
thread and the caller waits at most ``timeout_s``. On a timeout the thread's Python stack is taken
from ``sys._current_frames()`` (what ``faulthandler`` prints, but as text we can put in a record),
the call is abandoned, and the run goes on. Python cannot kill a thread: the abandoned call keeps
running until the process exits, which the process does at the end of the run (daemon threads do
not hold it up). Multi-rank backends, which run in their own processes, have the launcher's
watchdog (every rank's stack, no orphans) underneath this one.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class CallTimeout(Exception):
    """The call did not return within its deadline; ``stack`` is where it was at that moment."""

    def __init__(self, timeout_s: float, stack: str) -> None:
        super().__init__(f"did not return within {timeout_s:g} s")
        self.timeout_s = timeout_s
        self.stack = stack


@dataclass
class _Box(Generic[T]):
    value: T | None = None
    error: BaseException | None = None


def call_with_deadline(fn: Callable[[], T], timeout_s: float, name: str = "moeconf-backend") -> T:
    """``fn()``, or ``CallTimeout`` after ``timeout_s``. Whatever ``fn`` raises (``SystemExit``
    included) is re-raised here, in the caller's thread."""
    box: _Box[T] = _Box()
    threads = torch.get_num_threads()

    def target() -> None:
        # NOTE: torch's intra-op thread count is per OS thread (an OpenMP setting): without this the
        # call would run with the default count, not the caller's (see use_threads_for_tiny_shapes).
        torch.set_num_threads(threads)
        try:
            box.value = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who decides
            box.error = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        frame = sys._current_frames().get(thread.ident or -1)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "<no stack: thread not found>"
        raise CallTimeout(timeout_s, stack)
    if box.error is not None:
        raise box.error
    return box.value  # type: ignore[return-value]
