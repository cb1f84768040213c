"""Faults of the machine, told apart from faults of the code that runs on the ranks.

A multi-rank run needs a writable temp dir (the launcher's run dirs, the compiler's scratch files),
a free local TCP port (the ranks' rendezvous) and, for DeepSpeed, a writable torch-extension dir.
When one of these is missing, the ranks die or wait for reasons that have nothing to do with the MoE
code; :class:`EnvironmentProblem` carries a one-line message that names the path or resource and
the variable to set, and callers report it as a setup fault instead of a failed check.

:func:`environment_cause` reads a dead rank's exception for the same faults (conservatively: only
signatures that cannot come from the code under test).

Standard library only (imported by the launcher and by ranks before torch).
"""

from __future__ import annotations

import errno
import os
import re
import socket
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path


class EnvironmentProblem(RuntimeError):
    """A fault outside the code under test; ``str()`` is one line naming the cause and the fix."""


# --------------------------------------------------------------------------
# preflight checks


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (what ``makedirs`` would write into)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def ensure_writable_dir(path: Path, what: str, fix: str) -> None:
    """Create ``path`` if needed and prove it writable by creating and removing a file in it.

    Why a real write: permission bits do not tell (root ignores them; read-only mounts, full disks
    and a path under a regular file do not show in ``os.access``).
    """
    probe = path / f".moeconf-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        where = f"{path}" if path.exists() else f"{path} (cannot create it in {_first_existing(path)})"
        raise EnvironmentProblem(f"{what} {where} is not writable ({reason}): {fix}") from None


def check_temp_dir() -> Path:
    """The temp dir the launcher and the compiler will use, proven writable.

    ``tempfile`` silently falls back from an unusable ``$TMPDIR`` to ``/tmp``, but gcc and ninja do
    not, so a set ``TMPDIR`` must itself be usable.
    """
    explicit = os.environ.get("TMPDIR")
    if explicit:
        ensure_writable_dir(Path(explicit), "TMPDIR", "set TMPDIR to a writable directory (or unset it)")
    try:
        root = Path(tempfile.gettempdir())
    except (FileNotFoundError, OSError) as exc:  # no candidate was usable
        raise EnvironmentProblem(f"no writable temp directory ({exc}): set TMPDIR to a writable directory") from None
    ensure_writable_dir(root, "the temp directory", "set TMPDIR to a writable directory")
    return root


def check_free_port() -> int:
    """A TCP port on 127.0.0.1 the ranks can rendezvous on (bind 0, then close)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    except OSError as exc:
        raise EnvironmentProblem(
            f"cannot bind a TCP port on 127.0.0.1 ({exc.strerror or exc}): the ranks rendezvous on a local port; "
            "check that the loopback interface is up and ports are not exhausted"
        ) from None


# --------------------------------------------------------------------------
# ranks that died of the environment

# errno values that say "the machine would not let us", never "the code computed something wrong".
_ENV_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR}
# Always environmental, wherever they happen: a disk that is full, a quota that is used up.
_ANYWHERE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_OSERROR_LINE = re.compile(
    r"^(?P<type>PermissionError|OSError|NotADirectoryError|FileNotFoundError|IsADirectoryError)"
    r": \[Errno (?P<errno>\d+)\] (?P<reason>[^:]+)(?:: '(?P<path>[^']*)')?"
)
_ADDR_IN_USE = re.compile(r"EADDRINUSE|[Aa]ddress already in use")
_BUILD_FAILED = re.compile(r"Error building extension '(?P<op>[^']+)'")


def _last_exception_line(traceback_text: str) -> str:
    lines = [ln for ln in traceback_text.strip().splitlines() if ln and not ln.startswith(" ")]
    return lines[-1] if lines else ""


def _fix_for(path: str, machine_dirs: Mapping[Path, str]) -> str | None:
    """The fix of the innermost machine dir that contains ``path`` (None: not under any)."""
    resolved = os.path.abspath(path)
    inside = [d for d in machine_dirs if resolved == str(d) or resolved.startswith(str(d).rstrip(os.sep) + os.sep)]
    return machine_dirs[max(inside, key=lambda d: len(str(d)))] if inside else None


def environment_cause(traceback_text: str, machine_dirs: Mapping[Path, str]) -> str | None:
    """One line (cause: fix) when a rank's traceback shows a fault of the machine, else None.

    Recognised (and nothing else, so that a bug in the code under test is never excused):

    * an ``OSError`` whose errno means "not allowed / read-only / not a directory" on a path under
      one of ``machine_dirs`` (dir → fix: the torch-extension dir, the temp dir, ``HOME``), or "no
      space / quota exceeded" anywhere;
    * ``Address already in use`` (another process took the rendezvous port);
    * ``Error building extension '<op>'`` (a DeepSpeed/torch JIT op failed to compile: the compiler
      or the cache, not the MoE code).
    """
    last = _last_exception_line(traceback_text)
    match = _OSERROR_LINE.match(last)
    if match:
        code, path = int(match["errno"]), match["path"]
        fix = _fix_for(path, machine_dirs) if path else None
        what = f"{match['type']}: {match['reason']}" + (f": {path}" if path else "")
        if code in _ANYWHERE_ERRNOS:
            return f"{what}: free some space" + (f" or {fix}" if fix else "")
        if code in _ENV_ERRNOS and fix:
            return f"{what}: {fix}"
    if _ADDR_IN_USE.search(last):
        return "address already in use: another process took the ranks' rendezvous port; rerun"
    build = _BUILD_FAILED.search(traceback_text)
    if build:
        return f"the JIT build of torch extension {build['op']} failed inside a rank (see its log): rerun"
    return None
