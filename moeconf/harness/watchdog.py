"""A deadline for single-process backend calls, with the stack of where a stuck call was.

Design choice (why a thread, not a worker subprocess): a backend is an arbitrary Python object handed
to moeconf (a patched block, a kernel binding, a closure over a framework's state); it need not be
picklable or importable by name in a fresh interpreter, and a worker per case would pay an import of
torch + transformers (seconds) on every one of thousands of tiny cases. So the call runs in a daemon
thread and the caller waits at most ``timeout_s``. On a timeout the thread's Python stack is taken
from ``sys._current_frames()`` (what ``faulthandler`` prints, but as text we can put in a record).
Multi-rank backends, which run in their own processes, have the launcher's watchdog (every rank's
stack, no orphans) underneath this one.

What happens to a call that timed out. Python cannot kill a thread, but it can ask one to stop:
the watchdog raises ``AbandonedCall`` inside it (``PyThreadState_SetAsyncExc``) and waits up to
``STOP_GRACE_S`` for it to unwind. A call stuck in Python code (a spin loop, a retry loop, a
``time.sleep`` loop, a multi-rank launcher polling its ranks) stops at its next bytecode, so its
``with``/``finally`` blocks run: its locks are released, its rank processes are cleaned up, and it
stops using the CPU before the next case starts. It is asked once: a backend that swallows
``BaseException`` keeps running. A call blocked *inside* native code (a kernel that never returns,
a C-level lock or socket wait, one long ``time.sleep``) only sees the request when it returns to
Python; until then it stays behind as a daemon thread, using no CPU while blocked, and the process
still exits at the end of the run (daemon threads do not hold it up). A call that is importing a
module is not interrupted: an interrupted import is discarded, so every later call would start it
over and time out in turn.

Imports do not count against the deadline: the first call of a fresh process imports transformers'
modeling code (seconds on a loaded machine), which is not the backend being slow. When the deadline
passes while the call is inside an import, the watchdog waits for the import to end and then gives
the call its whole deadline again (at most ``IMPORT_GRACE_S`` spent waiting on imports; an import
that hangs is reported like any other hang). ``CallTimeout.stopped`` says whether the call unwound;
the record says so. Later calls run in fresh threads meanwhile; they are independent of a call left behind
unless the backend shares mutable state between calls (the engine gives every call its own copy of
the inputs). The same request to stop goes to the call when the caller is interrupted (Ctrl-C).

Thread-local state the caller set up is carried into the worker: torch's intra-op thread count
(an OpenMP setting, per OS thread) and the current CUDA/NPU device (per host thread).
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

T = TypeVar("T")

STOP_GRACE_S = 1.0
"""How long a timed-out call gets to unwind after it was asked to stop (a Python-level loop needs
microseconds; more would only delay the next case when the call is blocked in native code)."""


IMPORT_GRACE_S = 120.0
"""How long a call may spend in imports past its deadline, in all (see the module docstring)."""
IMPORT_POLL_S = 0.05


class CallTimeout(Exception):
    """The call did not return within its deadline.

    Attributes:
        stack: where it was at that moment (the backend's frames, innermost last).
        stopped: whether it unwound when asked to; False: it is blocked in native code and was left
            running in the background.
    """

    def __init__(self, timeout_s: float, stack: str, stopped: bool = False) -> None:
        super().__init__(f"did not return within {timeout_s:g} s")
        self.timeout_s = timeout_s
        self.stack = stack
        self.stopped = stopped


class AbandonedCall(BaseException):
    """Raised inside a timed-out call to make it unwind. A BaseException so that a backend's own
    ``except Exception`` (a retry loop) does not swallow it."""


@dataclass
class _Box(Generic[T]):
    value: T | None = None
    error: BaseException | None = None


def _caller_state() -> Callable[[], None]:
    """A function that applies the caller's thread-local torch state in another thread."""
    threads = torch.get_num_threads()
    cuda = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    npu_module = getattr(torch, "npu", None)
    npu = _npu_device(npu_module)

    def apply() -> None:
        # NOTE: torch's intra-op thread count is per OS thread (an OpenMP setting): without this the
        # call would run with the default count, not the caller's (see use_threads_for_tiny_shapes).
        torch.set_num_threads(threads)
        if cuda is not None:
            torch.cuda.set_device(cuda)  # the current device is per host thread; default would be 0
        if npu is not None:
            npu_module.set_device(npu)  # type: ignore[union-attr]

    return apply


def _npu_device(npu_module: object) -> int | None:
    """The caller's current NPU, only where torch_npu is loaded and initialised (never initialise it)."""
    try:
        if npu_module is not None and npu_module.is_available() and npu_module.is_initialized():  # type: ignore[attr-defined]
            return int(npu_module.current_device())  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - an emulator or a partial torch_npu: nothing to carry over
        return None
    return None


def _stack_of(thread: threading.Thread) -> str:
    """The thread's Python stack, without the frames of ``threading`` and of this module."""
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return "<no stack: the thread had just finished>"
    frames = traceback.extract_stack(frame)
    here = os.path.abspath(__file__)
    ours = {here, os.path.abspath(threading.__file__)}
    kept = [f for f in frames if os.path.abspath(f.filename) not in ours]
    return "".join(traceback.format_list(kept or frames))


def _importing(thread: threading.Thread) -> bool:
    """Whether ``thread`` is executing an ``import`` (a frame of importlib's bootstrap is on its stack)."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _ask_to_stop(thread: threading.Thread) -> bool:
    """Raise ``AbandonedCall`` in ``thread``; whether it finished within ``STOP_GRACE_S``."""
    ident = thread.ident
    if ident is None or not thread.is_alive():
        return True
    if _importing(thread):  # see the module docstring: let the import finish, do not discard it
        return False
    set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
    hit = set_async_exc(ctypes.c_ulong(ident), ctypes.py_object(AbandonedCall))
    if hit > 1:  # never expected: more than one thread state matched; undo rather than guess
        set_async_exc(ctypes.c_ulong(ident), None)
        return False
    thread.join(STOP_GRACE_S)
    return not thread.is_alive()


def _wait(thread: threading.Thread, deadline_s: float | None) -> None:
    """Join ``thread`` for ``deadline_s`` (None: forever); an import in flight at the deadline restarts
    the clock once it ends (bounded by ``IMPORT_GRACE_S``)."""
    thread.join(deadline_s)
    grace_end = time.monotonic() + IMPORT_GRACE_S
    while thread.is_alive() and _importing(thread) and time.monotonic() < grace_end:
        while thread.is_alive() and _importing(thread) and time.monotonic() < grace_end:
            thread.join(IMPORT_POLL_S)
        if thread.is_alive() and not _importing(thread):
            thread.join(deadline_s)


def call_with_deadline(fn: Callable[[], T], timeout_s: float | None, name: str = "moeconf-backend") -> T:
    """``fn()``, or ``CallTimeout`` after ``timeout_s`` (None, 0 or inf: no deadline). Whatever ``fn``
    raises (``SystemExit`` and ``KeyboardInterrupt`` included) is re-raised here, in the caller's
    thread."""
    box: _Box[T] = _Box()
    apply_state = _caller_state()

    def target() -> None:
        try:
            try:
                apply_state()  # inside: a failure here is the call's error, not a stray thread traceback
                box.value = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who decides
                box.error = exc
        except AbandonedCall:  # asked to stop between the two handlers: nothing left to report
            pass

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    deadline = timeout_s if timeout_s is not None and 0 < timeout_s < math.inf else None
    try:
        _wait(thread, deadline)
    except BaseException:  # Ctrl-C while waiting: do not leave the call running behind the caller
        _ask_to_stop(thread)
        raise
    if thread.is_alive():
        stack = _stack_of(thread)  # before asking it to stop: where it was stuck, not where it unwound
        raise CallTimeout(deadline or 0.0, stack, stopped=_ask_to_stop(thread))
    if box.error is not None:
        raise box.error
    return box.value  # type: ignore[return-value]
