"""Run dirs that never outlive their run, whatever ends it.

Each launch writes payload, results, stacks and rank logs into a ``moeconf-ranks-*`` temp dir
(~1 MB). How each way of ending a run removes it:

* normal return, a failed run, ``KeyboardInterrupt``: ``run_ranks``' ``finally`` (cleanup is
  completed even if a second Ctrl-C or a watchdog's stop request arrives meanwhile: the
  interruption is held back, then re-raised);
* ``SIGTERM``/``SIGHUP`` while their action is the default one (a plain script, a CI runner's
  cancel): :func:`terminations_unwind` turns them into an exception for the duration of the launch,
  so the same ``finally`` runs, then the process dies of the signal as it would have;
* interpreter exit while a launch is still running in another thread (the engine runs backends in a
  daemon thread): the ``atexit`` hook removes every dir still registered;
* ``SIGKILL`` (nothing can run): the dir's name records its owner (PID namespace, PID and process
  start time), and the next launch removes the dirs whose owner is gone
  (:func:`sweep_orphaned_run_dirs`). Only dirs with that name pattern, owned by this user, whose
  owner process is verifiably gone are touched; never another live run's.

Standard library only.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RUN_DIR_PREFIX = "moeconf-ranks-"
_OWNED = re.compile(rf"^{re.escape(RUN_DIR_PREFIX)}(?P<ns>\d+)\.(?P<pid>\d+)\.(?P<start>\d+)-")

_live_dirs: set[Path] = set()
_live_lock = threading.Lock()


# --------------------------------------------------------------------------
# owner identity


def _pid_namespace() -> int:
    """Inode of this process's PID namespace: a PID means something only inside its namespace."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), None if gone.

    With the PID it names one process for good: a recycled PID has a later start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19]) if fields[0] not in ("Z", "X") else None


def _owner_tag() -> str:
    pid = os.getpid()
    return f"{_pid_namespace()}.{pid}.{_start_time(pid) or 0}"


def _owner_gone(name: str) -> bool:
    """Whether the run dir ``name`` belongs to a process that no longer exists (False if unsure)."""
    match = _OWNED.match(name)
    if match is None:
        return False  # not made by this scheme: not ours to judge
    if int(match["ns"]) != _pid_namespace():
        return False  # another PID namespace (a container sharing /tmp): its PIDs mean nothing here
    return _start_time(int(match["pid"])) != int(match["start"])


# --------------------------------------------------------------------------
# making, releasing and sweeping run dirs


def make_run_dir() -> Path:
    """A fresh run dir in the temp root, named after its owner and registered for exit cleanup.

    The owner is in the *name* (not in a file inside) so that it exists from the instant the dir
    does: a SIGKILL between ``mkdtemp`` and writing a marker cannot leave an unattributable dir.
    """
    path = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{_owner_tag()}-"))
    with _live_lock:
        _live_dirs.add(path)
    return path


def release_run_dir(path: Path) -> None:
    """Remove ``path`` and forget it."""
    shutil.rmtree(path, ignore_errors=True)
    with _live_lock:
        _live_dirs.discard(path)


def sweep_orphaned_run_dirs(root: Path | str | None = None) -> list[Path]:
    """Remove the run dirs in ``root`` (default: the temp root) left by runs whose process is gone
    (a SIGKILLed gate); return them."""
    base = Path(root) if root is not None else Path(tempfile.gettempdir())
    try:
        entries = list(base.iterdir())
    except OSError:
        return []
    removed = []
    uid = os.getuid()
    for path in entries:
        if not path.name.startswith(RUN_DIR_PREFIX):
            continue
        try:
            if not path.is_dir() or path.is_symlink() or path.stat().st_uid != uid:
                continue
        except OSError:
            continue
        if _owner_gone(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _release_all_at_exit() -> None:
    with _live_lock:
        paths = list(_live_dirs)
    for path in paths:
        release_run_dir(path)


atexit.register(_release_all_at_exit)


# --------------------------------------------------------------------------
# signals


_DEFERRED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_UNWOUND = (signal.SIGTERM, signal.SIGHUP)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back while cleaning up (main thread only; they are delivered
    right after). Why: a second Ctrl-C in the middle of killing the ranks would leave them, or the
    run dir, half-cleaned."""
    if not _in_main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Terminated(BaseException):
    """SIGTERM/SIGHUP arrived during a launch (see :func:`terminations_unwind`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


@contextmanager
def terminations_unwind() -> Iterator[None]:
    """While the block runs, SIGTERM/SIGHUP whose action is the default (terminate at once, no
    cleanup) raise :class:`Terminated` instead, so ``finally`` blocks kill the ranks and remove the
    run dir; afterwards the process dies of the signal exactly as it would have. A handler the
    program installed itself (the CLI turns SIGTERM into ``KeyboardInterrupt``) is left alone, and
    so is everything outside the main thread (Python delivers signals there only)."""
    if not _in_main_thread():
        yield
        return
    installed = {
        sig: signal.signal(sig, _raise_terminated) for sig in _UNWOUND if signal.getsignal(sig) == signal.SIG_DFL
    }
    try:
        yield
    except Terminated as exc:
        _restore(installed)
        installed = {}
        os.kill(os.getpid(), exc.signum)  # the default action now: the process ends here
        raise SystemExit(128 + exc.signum) from None  # only if the signal is blocked
    finally:
        _restore(installed)


def _restore(handlers: dict[int, object]) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)  # type: ignore[arg-type]
