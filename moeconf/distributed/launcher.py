"""Run a rank function on N local processes, with a hang/crash watchdog.

Design choices (why):

* Each rank is a **fresh interpreter** (``subprocess`` running
  ``python -m moeconf.distributed._rank_main``), not a ``torch.multiprocessing``
  spawn child: spawn would still unpickle the parent's ``__main__`` and share
  inherited fds/env in surprising ways, while a clean ``exec`` guarantees that
  DeepSpeed accelerator selection, ``torch.distributed`` state, JIT-extension
  handles, etc. never leak between runs or from the test process.
* All ranks of one run share **one process group** (rank 0 leads a new group,
  the others join it), so ``os.killpg`` reaches the whole tree, including
  grandchildren such as compiler or ``ninja`` processes. Rank exits are
  observed with ``waitid(WNOWAIT)`` and ranks are reaped only after the final
  ``killpg``: the leader's pid therefore stays reserved and ``killpg`` can
  never hit an unrelated group that reused the number.
* Each run exports a unique ``MOECONF_RUN_ID``; cleanup also SIGKILLs any
  process whose initial environment carries it (catches grandchildren that
  called ``setsid``), and ranks set ``PR_SET_PDEATHSIG`` so a SIGKILLed parent
  does not leave orphans.
* Stacks are collected with ``faulthandler`` on ``SIGUSR1`` (registered by each
  rank at start-up), which works even while a rank is blocked inside a C++
  collective.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from moeconf.distributed.cleanup import (
    make_run_dir,
    release_run_dir,
    signals_deferred,
    sweep_orphaned_run_dirs,
    terminations_unwind,
)

Status = Literal["ok", "deadlock", "crash", "error"]

# Exit codes of _rank_main.
EXIT_OK = 0
EXIT_FN_FAILED = 1
EXIT_BAD_INVOCATION = 2


def stack_path(run_dir: Path, rank: int) -> Path:
    """Per-rank file receiving faulthandler dumps on SIGUSR1."""
    return run_dir / f"rank{rank}.stack.txt"


def result_path(run_dir: Path, rank: int) -> Path:
    """Per-rank pickled result record."""
    return run_dir / f"rank{rank}.result.pkl"


def payload_path(run_dir: Path) -> Path:
    """Pickled ``(fn_spec, fn_file, pickled_args, backend, pg_timeout_s)``; for a rank pool
    (``_rank_main RUN_DIR --pool``) ``fn_spec`` is None and each job has its own file."""
    return run_dir / "payload.pkl"


def job_path(run_dir: Path, job_no: int) -> Path:
    """Pickled ``(fn_spec, fn_file, pickled_args)`` of a rank pool's job ``job_no``."""
    return run_dir / f"job{job_no}.pkl"


def job_result_path(run_dir: Path, rank: int, job_no: int) -> Path:
    """Per-rank pickled result record of a rank pool's job ``job_no``."""
    return run_dir / f"rank{rank}.job{job_no}.result.pkl"


POOL_FLAG = "--pool"


RUN_ID_ENV = "MOECONF_RUN_ID"
POLL_S = 0.1  # crash detection latency
STACK_DUMP_WAIT_S = 2.0  # max wait for faulthandler dumps after SIGUSR1
TAIL_BYTES = 8192  # stdout/stderr tail kept per rank
REPORT_LOG_LINES = 40  # per rank in report(): the last log lines say why; thousands bury it
REPORT_EXCEPTION_LINES = 80  # per rank in report(): chained tracebacks keep their last part
PORT_ATTEMPTS = 3  # retries when the chosen MASTER_PORT was taken meanwhile
# The in-rank collective timeout must exceed the watchdog deadline, otherwise
# a hang would surface as a gloo timeout exception ("crash") instead of a
# "deadlock" with stacks.
PG_TIMEOUT_MARGIN_S = 60.0


@dataclass
class RankOutcome:
    """What happened to one rank."""

    rank: int
    exitcode: int | None = None
    """Process exit status; negative = killed by that signal (``Popen`` style)."""
    signal: str | None = None
    """Name of the signal that ended the rank (e.g. ``"SIGKILL"``), if any."""
    result: Any = None
    """Return value of the rank function (only when it returned)."""
    exception: str | None = None
    """Formatted traceback when the rank function (or init) raised."""
    stack: str | None = None
    """faulthandler dump of all threads, taken on a hang or a peer's crash."""
    stdout_tail: str = ""
    stderr_tail: str = ""
    killed_by_launcher: bool = False
    """True when the rank was still alive and the watchdog killed it."""

    def describe_exit(self) -> str:
        """One-line exit summary."""
        if self.killed_by_launcher:
            return "killed by the launcher (was still running)"
        if self.exitcode is None:
            return "returned; still up in its rank pool"
        if self.signal:
            return f"killed by {self.signal}"
        return f"exit code {self.exitcode}"

    def exception_line(self) -> str | None:
        """``Type: message`` of the exception the rank raised (the traceback's last line)."""
        if not self.exception:
            return None
        lines = self.exception.rstrip().splitlines()
        frames = [i for i, ln in enumerate(lines) if ln.startswith("  File ")]
        # After the last frame: its indented source (and caret) lines, then the message, which may
        # span several lines (DeepSpeed's "disagreement between ranks" lists each rank's value).
        rest = lines[frames[-1] + 1 :] if frames else lines
        while rest and rest[0].startswith("    "):
            rest = rest[1:]
        message = " ".join(ln.strip() for ln in rest if ln.strip())
        return message or None

    def where(self) -> str | None:
        """``function at file.py:line``: where the rank raised, or was stuck when its stack was
        dumped, or (a fatal signal) where ``PYTHONFAULTHANDLER`` saw it die; None if unknown."""
        if self.exception:
            frames = _TRACEBACK_FRAME.findall(self.exception)
            if frames:
                return _frame_text(frames[-1])
        for text in (self.stack, self.stderr_tail if self.signal else None):
            frame = _innermost_main_frame(text or "")
            if frame:
                return frame
        return None


_TRACEBACK_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)', re.MULTILINE)
_DUMP_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)', re.MULTILINE)
_DUMP_THREAD = re.compile(r"^(?:Current thread|Thread) 0x[0-9a-f]+ .*:$", re.MULTILINE)


def _frame_text(frame: tuple[str, str, str]) -> str:
    file, line, func = frame
    return f"{func} at {os.path.basename(file)}:{line}"


def _main_thread(dump: str) -> str:
    """The main thread's part of a faulthandler dump: the thread whose outermost frames are the
    rank's entry point (else the one that took the signal)."""
    starts = [m.start() for m in _DUMP_THREAD.finditer(dump)]
    blocks = [dump[a:b] for a, b in zip(starts, [*starts[1:], len(dump)])] or [dump]
    main = next((b for b in blocks if "_rank_main" in b or "_run_module_as_main" in b), None)
    return main or next((b for b in blocks if b.startswith("Current thread")), blocks[0])


def _innermost_main_frame(dump: str) -> str | None:
    """Innermost frame of the main thread in a faulthandler dump (listed first)."""
    frames = _DUMP_FRAME.findall(_main_thread(dump))
    return _frame_text(frames[0]) if frames else None


def importing_module(dump: str) -> str | None:
    """The file whose module body the main thread was executing inside an ``import`` (innermost
    first), or None when it was not importing."""
    frames = _DUMP_FRAME.findall(_main_thread(dump))
    if not any(file.startswith("<frozen importlib") for file, _, _ in frames):
        return None
    bodies = [file for file, _, func in frames if func == "<module>" and not file.startswith("<")]
    return bodies[0] if bodies else "?"


@dataclass
class MultiRankResult:
    """Outcome of :func:`run_ranks`."""

    status: Status
    outcomes: list[RankOutcome]
    elapsed_s: float
    world_size: int
    deadline_s: float
    fn: str
    master_port: int | None = None
    failed_rank: int | None = None
    """For ``"crash"``: the rank that died first."""
    message: str = ""
    run_id: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def results(self) -> list[Any]:
        """Return values indexed by rank (``None`` for ranks that did not return)."""
        return [o.result for o in self.outcomes]

    @property
    def stacks(self) -> list[str | None]:
        """Stack dumps indexed by rank."""
        return [o.stack for o in self.outcomes]

    def raise_for_status(self) -> MultiRankResult:
        """Raise ``RuntimeError(report())`` unless the run succeeded."""
        if not self.ok:
            raise RuntimeError(self.report())
        return self

    def report(self) -> str:
        """Readable multi-line text with every rank's exit, traceback and stack."""
        lines = [
            (
                f"run_ranks({self.fn}) world_size={self.world_size} status={self.status.upper()} "
                f"elapsed={self.elapsed_s:.1f}s deadline={self.deadline_s:g}s port={self.master_port}"
            ),
        ]
        if self.message:
            lines.append(self.message)
        for o in self.outcomes:
            lines.append(f"--- rank {o.rank}: {o.describe_exit()}")
            if o.exception:
                lines += ["  exception:", _indent(_last_lines(_without_carets(o.exception), REPORT_EXCEPTION_LINES))]
            if o.stack:
                # complete: every thread's frames are what a hang is diagnosed from
                lines += ["  stack:", _indent(o.stack)]
            elif self.status != "ok" and not o.exception:
                lines.append("  stack: <none: process was already gone or did not answer SIGUSR1>")
            log = _log_tail(o) if self.status != "ok" else ""
            if log:
                lines += [f"  stderr (last {REPORT_LOG_LINES} lines at most):", _indent(log)]
        return "\n".join(lines)


def _last_lines(text: str, n: int) -> str:
    lines = text.rstrip().splitlines()
    if len(lines) <= n:
        return "\n".join(lines)
    return "\n".join([f"[... {len(lines) - n} earlier lines left out]", *lines[-n:]])


_CARETS = re.compile(r"^\s*[\^~]+\s*$")


def _without_carets(traceback_text: str) -> str:
    """Python 3.11+ underlines the failing expression of each frame (``^^^^``): no information the
    source line above does not give, and a third of the traceback's length."""
    return "\n".join(ln for ln in traceback_text.splitlines() if not _CARETS.match(ln))


def _log_tail(o: RankOutcome) -> str:
    """The rank's stderr tail without what the report already shows (``_rank_main`` prints the
    traceback it records) and without repeats (a warning per step), bounded to
    ``REPORT_LOG_LINES`` lines."""
    text = o.stderr_tail
    if o.exception and o.exception.strip() in text:
        text = text.replace(o.exception.strip(), "")
    seen: set[str] = set()
    kept = []
    for line in _without_carets(text).splitlines():
        if line.strip() and line not in seen:
            seen.add(line)
            kept.append(line)
    repeats = sum(1 for ln in _without_carets(text).splitlines() if ln.strip()) - len(kept)
    if not kept:
        return ""
    tail = _last_lines("\n".join(kept), REPORT_LOG_LINES)
    return tail + (f"\n[{repeats} repeated lines left out]" if repeats else "")


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.rstrip().splitlines())


# --------------------------------------------------------------------------
# process bookkeeping (module level so atexit can reach every live run)

_live_runs: dict[str, int] = {}  # run_id -> pgid
_live_lock = threading.Lock()


def _kill_everything_at_exit() -> None:
    with _live_lock:
        runs = list(_live_runs.items())
    for run_id, pgid in runs:
        _killpg(pgid)
        _kill_marked(run_id)


atexit.register(_kill_everything_at_exit)


def _killpg(pgid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _proc_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _pgid_and_state(pid: int) -> tuple[int, str] | None:
    """(pgrp, state) from /proc/PID/stat; the comm field may contain ')' or spaces."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[2]), fields[0]


def live_group_members(pgid: int) -> list[int]:
    """Non-zombie processes in process group ``pgid``."""
    out = []
    for pid in _proc_pids():
        info = _pgid_and_state(pid)
        if info and info[0] == pgid and info[1] not in ("Z", "X"):
            out.append(pid)
    return out


def processes_with_env(key: str, value: str) -> list[int]:
    """Live processes whose initial environment contains ``key=value``."""
    needle = f"{key}={value}".encode()
    me = os.getpid()
    found = []
    for pid in _proc_pids():
        if pid == me:
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue  # gone, zombie or not ours
        if needle in env.split(b"\0"):
            found.append(pid)
    return found


def _kill_marked(run_id: str) -> None:
    for pid in processes_with_env(RUN_ID_ENV, run_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _exit_status_nowait(pid: int) -> int | None:
    """Popen-style return code if ``pid`` has exited, without reaping it."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return 0  # reaped by someone else; nothing more to learn
    if info is None:
        return None
    if info.si_code == os.CLD_EXITED:
        return info.si_status
    return -info.si_status  # CLD_KILLED / CLD_DUMPED


def _signal_name(returncode: int | None) -> str | None:
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def free_port() -> int:
    """A TCP port that was free a moment ago (bind 0 then close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_tail(path: Path, nbytes: int = TAIL_BYTES, since: int = 0) -> str:
    """The last ``nbytes`` of ``path``, none of them before offset ``since`` (a pooled rank's log
    holds every job's lines; a job's report shows its own)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(since, size - nbytes))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------
# fn / env preparation


def fn_spec(fn: str | Callable[..., Any]) -> str:
    """Normalise ``fn`` to ``"package.module:qualname"`` and check it is importable
    by a fresh interpreter (no lambdas, closures or ``__main__`` functions)."""
    if isinstance(fn, str):
        if ":" not in fn:
            raise ValueError(f"fn string must be 'package.module:attr', got {fn!r}")
        return fn
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname:
        raise TypeError(f"cannot address {fn!r} by qualified name; pass 'pkg.module:attr'")
    if module == "__main__" or "<" in qualname:
        raise ValueError(
            f"{module}.{qualname} is not importable from a fresh interpreter "
            "(lambda, closure or __main__); move it to an importable module"
        )
    return f"{module}:{qualname}"


def _join_group_kwargs(pgid: int) -> dict[str, Any]:
    """Popen kwargs putting the child in process group ``pgid`` (0 = new group)."""
    if sys.version_info >= (3, 11):
        return {"process_group": pgid}
    # 3.10: no process_group=; setpgid in preexec_fn (fine: we start no threads).
    return {"preexec_fn": lambda: os.setpgid(0, pgid)}  # pragma: no cover


def _module_file(spec: str) -> str | None:
    """Source file of the fn's module if the parent has it loaded (fallback for
    ranks that cannot import it by name)."""
    module = sys.modules.get(spec.partition(":")[0])
    path = getattr(module, "__file__", None)
    return os.path.abspath(path) if path else None


def _pythonpath() -> str:
    """Parent's sys.path first, so anything importable here (e.g. test modules
    that pytest put on sys.path) is importable in the ranks too."""
    entries = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
    existing = os.environ.get("PYTHONPATH")
    if existing:
        entries.append(existing)
    return os.pathsep.join(dict.fromkeys(entries))


def _rank_env(base: dict[str, str], rank: int, world_size: int, port: int, run_id: str) -> dict[str, str]:
    env = dict(base)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MOECONF_PARENT_PID=str(os.getpid()),
        PYTHONUNBUFFERED="1",  # tails must be complete even if we SIGKILL
        PYTHONFAULTHANDLER="1",  # fatal signals (SIGSEGV...) dump to stderr
        PYTHONPATH=_pythonpath(),
    )
    env[RUN_ID_ENV] = run_id
    return env


def _base_env(world_size: int, user_env: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    # N ranks each spawning one thread per core would oversubscribe the CPU
    # badly (2 cores here); the caller can still override.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    if user_env:
        env.update(user_env)
    return env


# --------------------------------------------------------------------------
# one attempt (one port, one temp dir, one process group)


class LaunchSetupError(Exception):
    """The launch could not be prepared (no port, no temp dir): a fault of the machine, one line."""


class _Attempt:
    """Spawns the ranks of one attempt, watches them, and always cleans up."""

    def __init__(
        self,
        spec: str,
        fn_file: str | None,
        args_blob: bytes,
        world_size: int,
        deadline_s: float,
        backend: str | None,
        base_env: dict[str, str],
        start: float,
        pool: bool = False,
    ) -> None:
        self.pool = pool
        self.job_no: int | None = None
        """The pool's current job (results go to per-job files); None for a one-shot launch."""
        self.log_offsets: dict[str, int] = {}
        self.done_ranks: set[int] = set()
        self.spec = spec
        self.world_size = world_size
        self.deadline_s = deadline_s
        self.start = start
        self.run_id = uuid.uuid4().hex
        try:
            self.port = free_port()
        except OSError as exc:
            raise LaunchSetupError(
                f"cannot bind a TCP port on 127.0.0.1 for the ranks' rendezvous ({exc.strerror or exc})"
            ) from None
        try:
            self.dir = make_run_dir()
        except OSError as exc:
            raise LaunchSetupError(
                f"cannot create the ranks' run dir in {tempfile.gettempdir()} ({exc.strerror or exc}): "
                "set TMPDIR to a writable directory"
            ) from None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pgid: int | None = None
        self.exit_codes: list[int | None] = [None] * world_size
        self.death_tick: dict[int, int] = {}  # rank -> poll iteration that saw it exit
        self.killed_by_launcher: set[int] = set()
        self.stacks: dict[int, str] = {}
        self.usr1_sent: set[int] = set()
        self.reaped = False
        try:
            with open(payload_path(self.dir), "wb") as fh:
                self.pg_timeout_s = deadline_s + PG_TIMEOUT_MARGIN_S
                header = (None if pool else spec, fn_file, args_blob, backend, self.pg_timeout_s)
                pickle.dump(header, fh)
        except OSError as exc:
            self.remove_dir()
            raise LaunchSetupError(
                f"cannot write the ranks' payload to {self.dir} ({exc.strerror or exc}): "
                "set TMPDIR to a directory with free space"
            ) from None
        except BaseException:
            self.remove_dir()
            raise
        self.base_env = base_env

    # -- lifecycle --------------------------------------------------------

    def spawn(self) -> None:
        for rank in range(self.world_size):
            env = _rank_env(self.base_env, rank, self.world_size, self.port, self.run_id)
            with (
                open(self.dir / f"rank{rank}.stdout.txt", "wb") as out,
                open(self.dir / f"rank{rank}.stderr.txt", "wb") as err,
            ):
                proc = subprocess.Popen(
                    [sys.executable, "-m", "moeconf.distributed._rank_main", str(self.dir)]
                    + ([POOL_FLAG] if self.pool else []),
                    env=env,
                    # a pool's rank reads job numbers from its stdin; EOF tells it the parent is gone
                    stdin=subprocess.PIPE if self.pool else subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    close_fds=True,
                    # rank 0 leads a fresh group; the rest join it (rank 0 is
                    # never reaped before the end, so the group id stays valid).
                    **_join_group_kwargs(0 if self.pgid is None else self.pgid),
                )
            self.procs.append(proc)
            if self.pgid is None:
                self.pgid = proc.pid
                with _live_lock:
                    _live_runs[self.run_id] = self.pgid

    def watch(self) -> Status:
        """Poll until all ranks succeed, one fails, or the deadline passes."""
        tick = 0
        while True:
            tick += 1
            # Poll every rank before judging, so simultaneous deaths all get
            # the same tick (needed to pick the culprit fairly).
            for rank, proc in enumerate(self.procs):
                if self.exit_codes[rank] is None:
                    code = _exit_status_nowait(proc.pid)
                    if code is not None:
                        self.exit_codes[rank] = code
                        self.death_tick[rank] = tick
            if any(self._failed(r) for r in self.death_tick):
                return "crash"
            if self.pool:
                # A pooled rank does not exit after a job: it is done when it wrote an "ok" record.
                # One that raised exits right after writing its record: the next tick sees the exit.
                if all(self._job_done(r) for r in range(self.world_size)):
                    return "ok"
            elif len(self.death_tick) == self.world_size:
                return "ok"
            if time.monotonic() - self.start >= self.deadline_s:
                return "deadlock"
            time.sleep(POLL_S)

    def _failed(self, rank: int) -> bool:
        """Exited non-zero, by a signal, or without reporting a result; in a pool, exited at all."""
        return self.pool or self.exit_codes[rank] != 0 or not self._result_file(rank).exists()

    def _result_file(self, rank: int) -> Path:
        return result_path(self.dir, rank) if self.job_no is None else job_result_path(self.dir, rank, self.job_no)

    def _job_done(self, rank: int) -> bool:
        if rank in self.done_ranks:
            return True
        if not self._result_file(rank).exists():
            return False
        record = self._record(rank)
        if record is not None and record["kind"] == "ok":
            self.done_ranks.add(rank)  # unpickled once, not at every poll while peers still work
            return True
        return False

    # -- a pool's jobs ------------------------------------------------------

    def start_job(self, spec: str, fn_file: str | None, args_blob: bytes, deadline_s: float) -> None:
        """Hand job ``job_no + 1`` to every rank of the pool; its deadline starts now."""
        self.job_no = (self.job_no or 0) + 1
        self.spec = spec
        self.deadline_s = deadline_s
        self.start = time.monotonic()
        self.death_tick.clear()
        self.done_ranks.clear()
        for rank in range(self.world_size):
            for stream in ("stdout", "stderr"):
                path = self.dir / f"rank{rank}.{stream}.txt"
                self.log_offsets[path.name] = path.stat().st_size if path.exists() else 0
        tmp = self.dir / f"job{self.job_no}.tmp"
        with open(tmp, "wb") as fh:
            pickle.dump((spec, fn_file, args_blob), fh)
        os.replace(tmp, job_path(self.dir, self.job_no))  # whole, before any rank is told
        line = f"{self.job_no}\n".encode()
        for proc in self.procs:
            try:
                assert proc.stdin is not None
                proc.stdin.write(line)
                proc.stdin.flush()
            except OSError:
                pass  # the rank is gone: watch() reports it as this job's crash

    def finish_job(self) -> None:
        """Forget the finished job's payload (its tensors) and records; the ranks stay up."""
        assert self.job_no is not None
        job_path(self.dir, self.job_no).unlink(missing_ok=True)
        for rank in range(self.world_size):
            job_result_path(self.dir, rank, self.job_no).unlink(missing_ok=True)

    def alive_ranks(self) -> list[int]:
        return [r for r, p in enumerate(self.procs) if _exit_status_nowait(p.pid) is None]

    def dump_stacks(self, ranks: list[int]) -> None:
        """SIGUSR1 each rank, then wait (bounded) until its dump file settles."""
        self.usr1_sent.update(ranks)
        for rank in ranks:
            try:
                os.kill(self.procs[rank].pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        pending = set(ranks)
        sizes: dict[int, int] = {}
        deadline = time.monotonic() + STACK_DUMP_WAIT_S
        while pending and time.monotonic() < deadline:
            time.sleep(0.1)
            for rank in list(pending):
                path = stack_path(self.dir, rank)
                size = path.stat().st_size if path.exists() else 0
                # non-empty and unchanged since last look => dump is complete;
                # a rank that exited meanwhile will not write any more.
                exited = _exit_status_nowait(self.procs[rank].pid) is not None
                if exited or (size and sizes.get(rank) == size):
                    pending.discard(rank)
                sizes[rank] = size
        for rank in ranks:
            text = _read_tail(stack_path(self.dir, rank), 1 << 20).strip()
            if text:
                self.stacks[rank] = text

    def kill_all(self) -> None:
        """SIGKILL the group and marked escapees, wait for them, then reap ranks.

        Safe to call again (e.g. from ``finally`` after an interrupted call):
        signalling is repeated only until the ranks are reaped - after that the
        group id may be reused by an unrelated process group."""
        if self.reaped:
            return
        self.killed_by_launcher.update(self.alive_ranks())
        for _ in range(50):  # ~5 s worst case; SIGKILL normally takes ms
            if self.pgid is not None:
                _killpg(self.pgid)
            _kill_marked(self.run_id)
            if not (self.pgid and live_group_members(self.pgid)) and not processes_with_env(RUN_ID_ENV, self.run_id):
                break
            time.sleep(0.1)
        with _live_lock:
            _live_runs.pop(self.run_id, None)
        self.reaped = True
        for rank, proc in enumerate(self.procs):
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - D-state process
                code = None
            if self.exit_codes[rank] is None:
                self.exit_codes[rank] = code

    def remove_dir(self) -> None:
        release_run_dir(self.dir)

    def clean_up(self) -> None:
        """``kill_all`` + ``remove_dir``, completed even when interrupted meanwhile (a second Ctrl-C,
        the engine's watchdog asking the call to stop): the interruption is re-raised afterwards."""
        interrupted: BaseException | None = None
        for _ in range(3):
            try:
                with signals_deferred():
                    self.kill_all()
                    self.remove_dir()
                break
            except BaseException as exc:  # noqa: BLE001 - finish the cleanup first, then re-raise
                interrupted = exc
        if interrupted is not None:
            raise interrupted

    # -- results ------------------------------------------------------------

    def outcomes(self) -> list[RankOutcome]:
        return [self._outcome(rank) for rank in range(self.world_size)]

    def _outcome(self, rank: int) -> RankOutcome:
        code = self.exit_codes[rank]
        outcome = RankOutcome(
            rank=rank,
            exitcode=code,
            signal=_signal_name(code),
            stack=self.stacks.get(rank),
            stdout_tail=self._log_tail(rank, "stdout"),
            stderr_tail=self._log_tail(rank, "stderr"),
            # A rank still starting up (handler not yet installed) dies of
            # our SIGUSR1 instead of dumping; that is the launcher's doing too.
            killed_by_launcher=rank in self.killed_by_launcher or (rank in self.usr1_sent and code == -signal.SIGUSR1),
        )
        record = self._record(rank)
        if record is None:
            return outcome
        if record["kind"] == "ok":
            outcome.result = record["value"]
        else:
            outcome.exception = record["text"]
        return outcome

    def _log_tail(self, rank: int, stream: str) -> str:
        name = f"rank{rank}.{stream}.txt"
        return _read_tail(self.dir / name, since=self.log_offsets.get(name, 0))

    def _record(self, rank: int) -> dict[str, Any] | None:
        path = self._result_file(rank)
        if not path.exists():
            return None
        try:
            with open(path, "rb") as fh:
                return pickle.load(fh)
        except Exception as exc:  # noqa: BLE001 - e.g. result class not importable in the parent
            return {"kind": "exception", "text": f"cannot unpickle rank {rank} result: {exc!r}"}

    def port_clash(self) -> bool:
        """Did init fail because MASTER_PORT was taken after we picked it?"""
        for rank in range(self.world_size):
            record = self._record(rank)
            if record and record.get("addr_in_use"):
                return True
        return False

    def first_failed_rank(self) -> int | None:
        """The rank that died first. Ranks seen dead in the same poll tick are
        ordered: killed by a signal first, then by when they wrote their
        exception record (the culprit raises before its peers notice the
        broken connection and raise in turn)."""

        def key(rank: int) -> tuple[int, int, int]:
            signalled = (self.exit_codes[rank] or 0) < 0
            try:
                written = self._result_file(rank).stat().st_mtime_ns
            except OSError:
                written = 0
            return (self.death_tick[rank], 0 if signalled else 1, written)

        failed = [r for r in self.death_tick if self._failed(r)]
        return min(failed, key=key) if failed else None


# --------------------------------------------------------------------------
# public entry point


def run_ranks(
    fn: str | Callable[..., Any],
    args: tuple[Any, ...] = (),
    *,
    world_size: int = 2,
    deadline_s: float = 60,
    backend: str | None = "gloo",
    env: dict[str, str] | None = None,
) -> MultiRankResult:
    """Run ``fn(*args)`` on ``world_size`` fresh local processes.

    ``fn`` is a module-level callable or a ``"package.module:attr"`` string; it
    and ``args`` must be importable/picklable, and its return value picklable.
    Each rank gets ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/
    ``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` and has ``torch.distributed`` already
    initialised with ``backend`` (``None`` = let ``fn`` do it).

    Never raises for rank failures; inspect ``.status`` / ``.report()``:

    * ``"ok"``: every rank returned; ``.results[rank]`` holds the values.
    * ``"deadlock"``: ``deadline_s`` passed with ranks still running; every
      live rank's stack was dumped before everything was killed.
    * ``"crash"``: a rank exited non-zero, was killed by a signal or raised;
      ``.failed_rank`` names it, the others' stacks are attached.
    * ``"error"``: the launch could not start (spawn error, no free port,
      no writable temp dir); ``.message`` says which, in one line.

    Whatever happens (``KeyboardInterrupt``, a second one during cleanup,
    ``SIGTERM``), no rank process, child of a rank, or temp file survives the
    call; a SIGKILLed caller's run dir is removed by the next call
    (:mod:`moeconf.distributed.cleanup`).
    """
    spec = fn_spec(fn)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    args_blob = pickle.dumps(args)  # fail here, not in N ranks, on unpicklable args
    fn_file = _module_file(spec)
    base_env = _base_env(world_size, env)
    sweep_orphaned_run_dirs()  # what SIGKILLed runs left behind (never a live run's)
    start = time.monotonic()
    with terminations_unwind():
        return _attempts(spec, fn_file, args_blob, world_size, deadline_s, backend, base_env, start)


def _attempts(
    spec: str,
    fn_file: str | None,
    args_blob: bytes,
    world_size: int,
    deadline_s: float,
    backend: str | None,
    base_env: dict[str, str],
    start: float,
) -> MultiRankResult:
    """Up to ``PORT_ATTEMPTS`` launches (a new port each time the chosen one was taken meanwhile)."""
    message = ""
    for attempt_no in range(PORT_ATTEMPTS):
        try:
            attempt = _Attempt(spec, fn_file, args_blob, world_size, deadline_s, backend, base_env, start)
        except LaunchSetupError as exc:
            return _failed_to_start(spec, world_size, deadline_s, start, str(exc))
        try:
            try:
                attempt.spawn()
            except OSError as exc:
                return _finish(attempt, "error", start, f"failed to start ranks: {exc!r}")
            status = attempt.watch()
            if status == "crash" and attempt_no + 1 < PORT_ATTEMPTS and attempt.port_clash():
                message = f"port {attempt.port} was taken; retried on a new port"
                continue  # the finally below kills this attempt first
            return _finish(attempt, status, start, message)
        finally:
            # no-op when _finish already ran; essential on KeyboardInterrupt / Terminated
            attempt.clean_up()
    return _failed_to_start(  # pragma: no cover - needs 3 port clashes in a row
        spec,
        world_size,
        deadline_s,
        start,
        f"MASTER_PORT taken {PORT_ATTEMPTS} times in a row (address already in use)",
    )


def _failed_to_start(spec: str, world_size: int, deadline_s: float, start: float, message: str) -> MultiRankResult:
    return MultiRankResult(
        status="error",
        outcomes=[],
        elapsed_s=time.monotonic() - start,
        world_size=world_size,
        deadline_s=deadline_s,
        fn=spec,
        message=message,
    )


def _finish(attempt: _Attempt, status: Status, start: float, message: str) -> MultiRankResult:
    """Collect stacks of live ranks if needed, kill everything, build the result."""
    failed_rank = None
    if status in ("deadlock", "crash"):
        attempt.dump_stacks(attempt.alive_ranks())
    attempt.kill_all()
    if status == "crash":
        failed_rank = attempt.first_failed_rank()
        if failed_rank is not None:
            message = (message + "\n" if message else "") + f"rank {failed_rank} failed first"
    elif status == "deadlock":
        message = (message + "\n" if message else "") + (
            f"deadline of {attempt.deadline_s:g}s passed with ranks {sorted(attempt.killed_by_launcher)} still running"
        )
        if any("file_baton.py" in s for s in attempt.stacks.values()):
            message += (
                "\nhint: ranks wait on a torch-extension build lock; a killed build leaves "
                "it behind - see moeconf.distributed.deepspeed_env.find_stale_locks()"
            )
    return MultiRankResult(
        status=status,
        outcomes=attempt.outcomes(),
        elapsed_s=time.monotonic() - start,
        world_size=attempt.world_size,
        deadline_s=attempt.deadline_s,
        fn=attempt.spec,
        master_port=attempt.port,
        failed_rank=failed_rank,
        message=message,
        run_id=attempt.run_id,
    )


# --------------------------------------------------------------------------
# rank pools: ranks that stay up for job after job


class RankPool:
    """``world_size`` rank processes that run job after job (``run``), each under its own deadline.

    Why: a rank's start-up (importing torch, transformers, DeepSpeed; the rendezvous) costs ~20 s
    on a loaded 2-core machine, the job itself a few seconds, and a matrix has hundreds of jobs.

    How: the ranks are started exactly as by :func:`run_ranks` (one process group, ``RUN_ID_ENV``,
    ``PR_SET_PDEATHSIG``, faulthandler on ``SIGUSR1``), with ``--pool``: each initialises the process
    group once, then reads job numbers from its stdin, runs ``RUN_DIR/job<N>.pkl`` and writes
    ``rank<R>.job<N>.result.pkl``. The parent watches a job as it watches a launch: crash = any rank
    exits, hang = the job's deadline passes. A failed job is reported exactly like a failed launch
    (every live rank's stack, the job's part of each rank's log) and ends the pool: nothing of a
    failed job's state (a half-done collective, a dead peer) can reach the next job, which gets a
    fresh pool.

    The ranks are spawned by a thread that lives as long as the pool: ``PR_SET_PDEATHSIG`` fires
    when the *thread* that started a process ends, and callers (the engine's watchdog) run each
    call on a short-lived thread. Not thread-safe: one job at a time (``pooled_run`` hands a pool
    to one caller at a time).
    """

    def __init__(self, world_size: int = 2, backend: str | None = "gloo", env: dict[str, str] | None = None) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.backend = backend
        self.base_env = _base_env(world_size, env)
        self._attempt: _Attempt | None = None
        self._holder: threading.Event | None = None
        self.launches = 0
        """How many times ranks were started (a fresh pool after each failed job)."""

    @property
    def pids(self) -> list[int]:
        """The live ranks' process ids (empty when no ranks are up)."""
        return [p.pid for p in self._attempt.procs] if self._attempt is not None else []

    @property
    def run_id(self) -> str | None:
        return self._attempt.run_id if self._attempt is not None else None

    @property
    def alive(self) -> bool:
        """Ranks are up and every one of them is still running."""
        a = self._attempt
        return a is not None and len(a.procs) == self.world_size and len(a.alive_ranks()) == self.world_size

    def run(
        self, fn: str | Callable[..., Any], args: tuple[Any, ...] = (), *, deadline_s: float = 60
    ) -> MultiRankResult:
        """Run ``fn(*args)`` on every rank of the pool (started first if needed); same contract as
        :func:`run_ranks`. After a status other than ``"ok"`` the pool's ranks are gone; the next
        ``run`` starts new ones."""
        spec = fn_spec(fn)
        args_blob = pickle.dumps(args)  # fail here, not in N ranks, on unpicklable args
        fn_file = _module_file(spec)
        start = time.monotonic()
        with terminations_unwind():
            try:
                return self._run(spec, fn_file, args_blob, deadline_s, start)
            except BaseException:
                self.close()  # interrupted mid-job (Ctrl-C, the engine's watchdog): no half-done job survives
                raise

    def _run(
        self, spec: str, fn_file: str | None, args_blob: bytes, deadline_s: float, start: float
    ) -> MultiRankResult:
        message = ""
        for attempt_no in range(PORT_ATTEMPTS):
            a = self._attempt
            if a is not None and (not self.alive or a.pg_timeout_s < deadline_s + PG_TIMEOUT_MARGIN_S):
                # a rank died while idle (not this job's doing), or this job may wait in a collective
                # longer than the ranks' process-group timeout allows: start over
                self.close()
            fresh = self._attempt is None
            if fresh:
                try:
                    self._start(deadline_s, start)
                except LaunchSetupError as exc:
                    return _failed_to_start(spec, self.world_size, deadline_s, start, str(exc))
                except OSError as exc:
                    assert self._attempt is not None
                    result = _finish(self._attempt, "error", start, f"failed to start ranks: {exc!r}")
                    self.close()
                    return result
            a = self._attempt
            assert a is not None
            a.start_job(spec, fn_file, args_blob, deadline_s)
            status = a.watch()
            if status == "ok":
                result = MultiRankResult(
                    status="ok",
                    outcomes=a.outcomes(),
                    elapsed_s=time.monotonic() - start,
                    world_size=self.world_size,
                    deadline_s=deadline_s,
                    fn=spec,
                    master_port=a.port,
                    message=message,
                    run_id=a.run_id,
                )
                a.finish_job()
                return result
            if status == "crash" and fresh and attempt_no + 1 < PORT_ATTEMPTS and a.port_clash():
                message = f"port {a.port} was taken; retried on a new port"
                self.close()
                continue
            result = _finish(a, status, a.start, message)
            self.close()
            return result
        return _failed_to_start(  # pragma: no cover - needs 3 port clashes in a row
            spec, self.world_size, deadline_s, start, f"MASTER_PORT taken {PORT_ATTEMPTS} times in a row"
        )

    def _start(self, deadline_s: float, start: float) -> None:
        sweep_orphaned_run_dirs()  # what SIGKILLed runs left behind (never a live run's)
        attempt = _Attempt("", None, b"", self.world_size, deadline_s, self.backend, self.base_env, start, pool=True)
        self._attempt = attempt
        self.launches += 1
        spawned = threading.Event()
        closed = threading.Event()
        self._holder = closed
        failure: list[BaseException] = []

        def hold() -> None:
            try:
                attempt.spawn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                failure.append(exc)
            finally:
                spawned.set()
            closed.wait()  # the ranks' PR_SET_PDEATHSIG parent: must outlive them

        threading.Thread(target=hold, name=f"moeconf-rank-pool-{attempt.run_id[:8]}", daemon=True).start()
        spawned.wait()
        if failure:
            raise failure[0]

    def close(self) -> None:
        """Kill the ranks (and anything they started) and remove the run dir; idempotent."""
        attempt, self._attempt = self._attempt, None
        try:
            if attempt is not None:
                for proc in attempt.procs:
                    if proc.stdin is not None:
                        with contextlib.suppress(OSError):
                            proc.stdin.close()
                attempt.clean_up()
        finally:
            if self._holder is not None:
                self._holder.set()
                self._holder = None


# Pools kept between calls, least recently used first. Several backends of one `moeconf check` run
# arch after arch (the engine goes arch-major), so each backend keeps its own pool; beyond
# MAX_IDLE_POOLS the oldest is closed to bound memory (2 ranks with DeepSpeed loaded: ~1 GB).
# NOTE: at least the built-in multi-rank backends a suite runs together (zero3-leaf, zero2-dense,
# fsdp2-dense, ep-alltoall, ep-alltoall-4): with fewer, arch-major order closes the least recently
# used pool at every architecture and each backend pays its ~20 s start again (measured: a 4-backend
# run over 100 archs went from minutes to over 20 min with 3).
MAX_IDLE_POOLS = 6
_idle_pools: OrderedDict[Hashable, RankPool] = OrderedDict()
_pools_lock = threading.Lock()


def pooled_run(
    key: Hashable,
    fn: str | Callable[..., Any],
    args: tuple[Any, ...] = (),
    *,
    world_size: int = 2,
    deadline_s: float = 60,
    backend: str | None = "gloo",
    env: dict[str, str] | None = None,
) -> MultiRankResult:
    """:func:`run_ranks` on the idle pool kept under ``key`` (made on first use): the ranks stay up
    for the next call with the same key. ``key`` must name everything that makes ranks differ
    (rank function, world size, env): jobs of one key share their processes' module state.

    A pool is taken out of the registry while it runs a job, so a concurrent call with the same key
    (a call the engine's watchdog abandoned is still running) gets a pool of its own."""
    with _pools_lock:
        pool = _idle_pools.pop(key, None)
    if pool is None:
        pool = RankPool(world_size, backend, env)
    result = pool.run(fn, args, deadline_s=deadline_s)  # closes the pool itself on failure
    if pool.alive:
        with _pools_lock:
            evicted = [_idle_pools.pop(key)] if key in _idle_pools else []
            _idle_pools[key] = pool
            while len(_idle_pools) > MAX_IDLE_POOLS:
                evicted.append(_idle_pools.popitem(last=False)[1])
        for old in evicted:
            old.close()
    return result


def close_pools() -> None:
    """Close every idle pool (at exit, and for callers that want the ranks gone now)."""
    with _pools_lock:
        pools = list(_idle_pools.values())
        _idle_pools.clear()
    for pool in pools:
        pool.close()


def idle_pools() -> dict[Hashable, RankPool]:
    """The idle pools by key (a snapshot, for tests and diagnostics)."""
    with _pools_lock:
        return dict(_idle_pools)


atexit.register(close_pools)
