"""DeepSpeed on CPU: environment, JIT-op prebuild and stale build-lock detection.

With ``DS_ACCELERATOR=cpu`` and no oneCCL, DeepSpeed wraps the gloo process
group in its ``TorchBackend``, whose constructor JIT-compiles the
shared-memory collective extension ``deepspeed_shm_comm``
(``ShareMemCommBuilder``: ``csrc/cpu/comm/shm_interface.cpp`` + ``shm.cpp``)
through ``torch.utils.cpp_extension.load``. That first build takes about a
minute on 2 cores; later loads reuse ``<root>/deepspeed_shm_comm/*.so``.
(ZeRO-2 init with a torch client optimizer builds nothing else.)

``torch.utils.cpp_extension`` serialises builds with a ``lock`` file created
with ``O_CREAT|O_EXCL`` in the extension's build folder; the builder keeps its
descriptor open until it deletes the file. A builder killed mid-build (e.g.
by a watchdog) leaves the file behind, and every later ``load`` polls
``os.path.exists(lock)`` forever. :func:`ensure_deepspeed_cpu_ops` builds the
op once, up front, in a subprocess with a deadline, and turns such a stale
lock into an immediate one-line error instead of a silent hang in N ranks.

Importing this module does not import torch or deepspeed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeconf.distributed.environment import EnvironmentProblem, ensure_writable_dir

SHM_COMM_BUILDER = "ShareMemCommBuilder"
SHM_COMM_OP = "deepspeed_shm_comm"
LOCK_NAME = "lock"
# Only used when some process's fd table cannot be inspected (see
# find_stale_locks); longer than any single compile step of these ops.
DEFAULT_STALE_AFTER_S = 600.0
_PROGRESS_EVERY_S = 15.0
_LOCK_CHECK_EVERY_S = 2.0


class StaleBuildLockError(EnvironmentProblem):
    """A torch-extension ``lock`` file whose build is no longer in progress."""


class HeldBuildLockError(EnvironmentProblem):
    """A torch-extension ``lock`` held by a process that will not release it soon (stopped, or
    still building after the wait)."""


class OpBuildError(EnvironmentProblem):
    """DeepSpeed could not be imported, or its CPU op failed to build (the machine's compiler,
    headers or cache, never the MoE code)."""


class OpBuildTimeout(OpBuildError, TimeoutError):
    """The op build ran past its deadline."""


def deepspeed_cpu_env() -> dict[str, str]:
    """Environment to pass to ranks (``run_ranks(env=...)``) for DeepSpeed on CPU."""
    return {"DS_ACCELERATOR": "cpu"}


# --------------------------------------------------------------------------
# build locks


def extensions_root() -> Path:
    """Where torch puts JIT extensions: ``$TORCH_EXTENSIONS_DIR``, else the
    user cache dir (``$XDG_CACHE_HOME`` or ``~/.cache``) ``/torch_extensions``.

    torch appends a ``py311_cpu``-style folder in the second case only;
    :func:`find_stale_locks` searches two levels deep, covering both layouts.
    """
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "torch_extensions"


def _lock_files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted({*root.glob(f"*/{LOCK_NAME}"), *root.glob(f"*/*/{LOCK_NAME}")})


def _open_file_table() -> tuple[set[str], set[int]]:
    """Targets of every open fd on this machine, and the uids of processes whose fds were unreadable."""
    targets: set[str] = set()
    unreadable_uids: set[int] = set()
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except FileNotFoundError:
            continue  # exited meanwhile
        except PermissionError:
            # another user's (or a non-dumpable) process: can't tell what it holds
            try:
                unreadable_uids.add(os.stat(f"/proc/{pid}").st_uid)
            except OSError:
                pass
            continue
        for fd in fds:
            try:
                targets.add(os.readlink(f"{fd_dir}/{fd}"))
            except OSError:
                pass
    return targets, unreadable_uids


def lock_holders(lock: Path) -> list[int]:
    """PIDs that hold ``lock`` open (the builder keeps its fd until done)."""
    wanted = str(lock.resolve())
    holders = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == wanted:
                    holders.append(int(pid))
                    break
            except OSError:
                pass
    return holders


def _last_activity(build_dir: Path) -> float:
    """Newest mtime in the build folder (ninja writes objects as it goes)."""
    newest = 0.0
    for path in [build_dir, *build_dir.rglob("*")]:
        try:
            newest = max(newest, path.stat().st_mtime)
        except OSError:
            pass
    return newest


def _stale_among(candidates: list[Path], stale_after_s: float) -> list[Path]:
    """The locks among ``candidates`` that no process holds (see :func:`find_stale_locks`)."""
    first, _ = _open_file_table()
    time.sleep(0.2)
    second, unreadable_uids = _open_file_table()
    stale = []
    for lock in candidates:
        try:
            owner = lock.stat().st_uid
        except OSError:
            continue  # released meanwhile
        resolved = str(lock.resolve())
        if resolved in first or resolved in second:
            continue
        # The builder that created the lock runs as the lock file's owner: if every process of that
        # user was readable, nobody holds it, whatever other users' processes we could not read.
        if owner not in unreadable_uids or time.time() - _last_activity(lock.parent) > stale_after_s:
            stale.append(lock)
    return stale


def find_stale_locks(root: Path | str | None = None, *, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> list[Path]:
    """Torch-extension ``lock`` files under ``root`` whose build is not in progress.

    Rule: a lock is **live** while any process holds it open, because
    ``FileBaton`` keeps the ``O_EXCL`` descriptor for the whole build (waiters
    only poll ``os.path.exists``). A lock nobody holds, seen twice 0.2 s apart
    (the holder closes the fd just before deleting the file), is **stale** -
    provided the fd table of every process of the lock file's owner was
    readable (the builder runs as that user). If some were not (a
    non-dumpable process, builds in another PID namespace sharing the cache),
    a lock is stale only if nothing in its build folder changed for
    ``stale_after_s`` seconds.
    """
    base = Path(root) if root is not None else extensions_root()
    candidates = _lock_files(base)
    return _stale_among(candidates, stale_after_s) if candidates else []


def stale_lock_message(lock: Path) -> str:
    """One-line diagnosis + fix."""
    return (
        f"stale torch-extension build lock {lock} (left by a killed build; every "
        f"DeepSpeed init would wait on it forever): no process holds it - fix: rm {lock}"
    )


# --------------------------------------------------------------------------
# prebuild

IMPORT_FAILED_EXIT = 3
"""Exit code of the prebuild subprocess when ``import deepspeed`` itself fails."""

_BUILD_SNIPPET = r"""
import json, sys, time
t0 = time.monotonic()
name = sys.argv[1]
try:
    from deepspeed.accelerator import get_accelerator
    import deepspeed.ops
except Exception as exc:
    print(json.dumps({"op": name, "import_error": f"{type(exc).__name__}: {exc}".splitlines()[0]}))
    sys.exit(3)  # IMPORT_FAILED_EXIT
builder = get_accelerator().create_op_builder(name)
if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
    print(json.dumps({"op": getattr(builder, "NAME", name), "compatible": False}))
    sys.exit(0)
t1 = time.monotonic()
builder.load(verbose=False)
t2 = time.monotonic()
print(json.dumps({"op": builder.NAME, "compatible": True,
                  "import_s": t1 - t0, "load_s": t2 - t1}))
"""


@dataclass
class OpBuildInfo:
    """What :func:`ensure_deepspeed_cpu_ops` did."""

    op: str
    compatible: bool
    was_cached: bool
    seconds: float
    """Wall time of the prebuild subprocess (import + build/load)."""
    load_s: float | None
    build_dir: Path | None


def _op_build_dirs(op: str, root: Path) -> list[Path]:
    return [p for p in (root / op, *root.glob(f"*/{op}")) if p.is_dir()]


def _has_built_library(op: str, root: Path) -> bool:
    return any(any(d.glob("*.so")) for d in _op_build_dirs(op, root))


def _raise_if_stale(root: Path, op: str | None = None) -> None:
    for lock in find_stale_locks(root):
        if op is None or lock.parent.name == op:
            raise StaleBuildLockError(stale_lock_message(lock))


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _remove_own_stale_lock(root: Path, op: str, since: float) -> list[Path]:
    """After we killed our own builder: drop locks it created (created after
    ``since`` and held by nobody). Older locks are someone else's to judge."""
    removed = []
    for lock in find_stale_locks(root):
        try:
            if lock.parent.name == op and lock.stat().st_mtime >= since:
                lock.unlink()
                removed.append(lock)
        except OSError:
            pass
    return removed


def ensure_deepspeed_cpu_ops(
    progress: Callable[[str], None] = print,
    timeout_s: float = 600,
    *,
    builder: str = SHM_COMM_BUILDER,
    op: str = SHM_COMM_OP,
) -> OpBuildInfo:
    """Build (or just load) DeepSpeed's CPU comm op once, before any rank needs it.

    Runs in a subprocess (own process group, ``DS_ACCELERATOR=cpu``) so a
    deadline can be enforced and the test process never imports DeepSpeed.
    Raises :class:`StaleBuildLockError` naming the lock and ``rm <path>`` when
    a dead build's lock would make the build wait forever (checked before and
    during the build), :class:`OpBuildTimeout` (a ``TimeoutError``) past
    ``timeout_s`` and :class:`OpBuildError` (a ``RuntimeError``) if DeepSpeed
    cannot be imported or the build fails; all three are
    :class:`~moeconf.distributed.environment.EnvironmentProblem`. Concurrent callers (pytest-xdist
    workers) are fine: one builds, the others wait on its live lock.
    """
    root = extensions_root()
    _raise_if_stale(root, op)
    cached = _has_built_library(op, root)
    progress(
        f"DeepSpeed CPU: loading cached JIT op {op} from {root}"
        if cached
        else f"DeepSpeed CPU: building JIT op {op} (first time only, ~1 min on 2 cores; cached under {root})"
    )
    env = {**os.environ, **deepspeed_cpu_env()}
    started_wall = time.time()
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", _BUILD_SNIPPET, builder],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # killpg reaches the compiler/ninja children
    )
    try:
        out = _wait_for_build(proc, progress, timeout_s, root, op, start, started_wall)
    finally:
        if proc.poll() is None:
            # Interrupted (Ctrl-C, SIGTERM turned into an exception): a builder killed mid-build
            # leaves its lock behind, and every later load would wait on it forever.
            _kill_group(proc)
            _remove_own_stale_lock(root, op, started_wall - 1)
    elapsed = time.monotonic() - start
    info = _parse_build_output(out, proc.returncode, op)
    dirs = _op_build_dirs(op, root)
    result = OpBuildInfo(
        op=info.get("op", op),
        compatible=bool(info.get("compatible")),
        was_cached=cached,
        seconds=elapsed,
        load_s=info.get("load_s"),
        build_dir=dirs[0] if dirs else None,
    )
    progress(
        f"DeepSpeed CPU: {result.op} ready in {elapsed:.1f}s"
        if result.compatible
        else f"DeepSpeed CPU: {result.op} not compatible here; DeepSpeed will use plain gloo"
    )
    return result


def _wait_for_build(
    proc: subprocess.Popen[str],
    progress: Callable[[str], None],
    timeout_s: float,
    root: Path,
    op: str,
    start: float,
    started_wall: float,
) -> str:
    """Wait with progress messages, a deadline and stale-lock checks; return output."""
    next_note = start + _PROGRESS_EVERY_S
    next_lock_check = start + _LOCK_CHECK_EVERY_S
    while True:
        try:
            out, _ = proc.communicate(timeout=0.5)
            return out
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if now - start > timeout_s:
            _kill_group(proc)
            removed = _remove_own_stale_lock(root, op, started_wall - 1)
            extra = f"; removed the lock it left: {removed[0]}" if removed else ""
            raise OpBuildTimeout(f"building DeepSpeed op {op} exceeded {timeout_s:g}s{extra}")
        if now >= next_lock_check:
            # Our builder may be waiting on a lock whose owner died meanwhile.
            next_lock_check = now + _LOCK_CHECK_EVERY_S
            for lock in find_stale_locks(root):
                if lock.parent.name == op and lock.stat().st_mtime < started_wall:
                    _kill_group(proc)
                    raise StaleBuildLockError(stale_lock_message(lock))
        if now >= next_note:
            next_note = now + _PROGRESS_EVERY_S
            progress(f"DeepSpeed CPU: still building {op} ({now - start:.0f}s)")


def _parse_build_output(out: str, returncode: int | None, op: str) -> dict[str, Any]:
    lines = out.strip().splitlines()
    last = lines[-1] if lines else ""
    if returncode in (0, IMPORT_FAILED_EXIT):
        try:
            info = json.loads(last)
        except json.JSONDecodeError:
            info = {}
        if returncode == 0 and info:
            return info
        if "import_error" in info:
            raise OpBuildError(
                f"deepspeed cannot be imported ({info['import_error']}): reinstall it "
                "(pip install 'moeconf[deepspeed]') or leave the DeepSpeed backends out"
            )
    # The first line says what and where; the compiler's last lines follow for the why.
    cause = next((ln.strip() for ln in reversed(lines) if "error" in ln.lower()), last.strip())
    tail = "\n".join(lines[-20:])
    raise OpBuildError(f"building DeepSpeed op {op} failed (exit {returncode}): {cause}\n{tail}")


# --------------------------------------------------------------------------
# before any rank starts: a writable cache, no dead build's lock, the op built

LOCK_WAIT_S = 600.0
"""How long to wait for another process's live build (one build takes ~1 min on 2 cores)."""
_STOPPED_STATES = frozenset("Tt")  # SIGSTOP / Ctrl-Z, or stopped under a tracer


def op_build_dir(op: str = SHM_COMM_OP) -> Path:
    """The folder torch builds ``op`` in (``torch.utils.cpp_extension._get_build_directory``'s rule:
    ``$TORCH_EXTENSIONS_DIR/<op>``, else ``<cache>/torch_extensions/py311_cpu/<op>``)."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit) / op
    import torch  # lazily: only the folder name needs it, and callers have torch loaded already

    if torch.version.hip is not None:
        accelerator = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda is not None:
        accelerator = "cu" + torch.version.cuda.replace(".", "")
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return extensions_root() / f"{python}_{accelerator}" / op


def extensions_fix() -> str:
    """Which variable moves the torch-extension cache."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return "set TORCH_EXTENSIONS_DIR to a writable directory"
    if os.environ.get("XDG_CACHE_HOME"):
        return "set TORCH_EXTENSIONS_DIR (or XDG_CACHE_HOME) to a writable directory"
    home = os.path.expanduser("~")
    return f"set TORCH_EXTENSIONS_DIR to a writable directory (the default is under HOME={home})"


def check_extensions_dir(op: str = SHM_COMM_OP) -> Path:
    """``op``'s build folder, created and proven writable.

    Why even when the op is built: torch takes its ``O_EXCL`` lock in that folder on every load, so a
    read-only cache fails every rank with ``PermissionError``.
    """
    build_dir = op_build_dir(op)
    ensure_writable_dir(build_dir, "the torch-extension build dir", extensions_fix())
    return build_dir


def _process_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()[0]


def _who(pids: list[int]) -> str:
    if not pids:
        return "a process that cannot be identified (some processes' open files are unreadable)"
    names = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = "?"
        names.append(f"PID {pid} ({cmd[:60]})")
    return ", ".join(names)


def settle_build_lock(lock: Path, notice: Callable[[str], None], wait_s: float = LOCK_WAIT_S) -> None:
    """Make sure ``lock`` cannot block a build: absent, removed, or released by its live builder.

    - nobody holds it (its builder was killed): removed, with a one-line ``notice``;
    - held by running processes (another run is building): waited for, up to ``wait_s``;
    - held only by stopped processes (Ctrl-Z'd, SIGSTOPped), or still held after ``wait_s``:
      :class:`HeldBuildLockError` naming the lock and the holders; nothing is removed.
    """
    deadline = time.monotonic() + wait_s
    announced = False
    while lock.exists():
        if _stale_among([lock], DEFAULT_STALE_AFTER_S):
            try:
                lock.unlink()
            except FileNotFoundError:
                return  # its builder finished meanwhile
            except OSError as exc:
                raise StaleBuildLockError(f"{stale_lock_message(lock)} (moeconf could not: {exc.strerror})") from None
            notice(f"removed stale torch-extension build lock {lock} (left by a killed build; no process held it)")
            return
        holders = lock_holders(lock)
        if holders and all(_process_state(pid) in _STOPPED_STATES for pid in holders):
            raise HeldBuildLockError(
                f"torch-extension build lock {lock} is held by stopped {_who(holders)}: "
                f"resume it (kill -CONT {holders[0]}) or end it, then rerun"
            )
        if time.monotonic() >= deadline:
            raise HeldBuildLockError(
                f"torch-extension build lock {lock} is still held by {_who(holders)} after {wait_s:g} s: "
                f"let that build finish or end it, then rerun (if no build is running: rm {lock})"
            )
        if not announced:
            notice(f"waiting up to {wait_s:g} s for {_who(holders)}, which is building {lock.parent.name}")
            announced = True
        time.sleep(0.5)


def prepare_deepspeed_cpu(
    notice: Callable[[str], None],
    *,
    lock_wait_s: float = LOCK_WAIT_S,
    build_timeout_s: float = 600,
    builder: str = SHM_COMM_BUILDER,
    op: str = SHM_COMM_OP,
) -> OpBuildInfo:
    """Everything DeepSpeed on CPU needs from the machine, done once before any rank starts.

    Checks that the build folder is writable, settles its build lock (:func:`settle_build_lock`) and
    builds or loads the op (:func:`ensure_deepspeed_cpu_ops`), so that ranks only load a finished
    op: a first run cannot look like a hang, and a killed build cannot block later runs. ``notice``
    gets one line per thing worth telling (a removed lock, a wait, a first build). Raises
    :class:`~moeconf.distributed.environment.EnvironmentProblem`.
    """
    lock = check_extensions_dir(op) / LOCK_NAME
    settle_build_lock(lock, notice, lock_wait_s)
    cached = _has_built_library(op, extensions_root())
    progress: Callable[[str], None] = (lambda _msg: None) if cached else notice
    try:
        return ensure_deepspeed_cpu_ops(progress, build_timeout_s, builder=builder, op=op)
    except StaleBuildLockError:
        # The build we were waiting on died meanwhile; its lock is stale now.
        settle_build_lock(lock, notice, lock_wait_s)
        return ensure_deepspeed_cpu_ops(progress, build_timeout_s, builder=builder, op=op)


# --------------------------------------------------------------------------
# rank function (for run_ranks) used to smoke-test DeepSpeed ZeRO on CPU


def zero_init_probe(stage: int = 2, steps: int = 1) -> dict[str, Any]:
    """Rank function: ``deepspeed.initialize`` a tiny model under ZeRO ``stage``
    on CPU/gloo and take ``steps`` optimizer steps.

    Uses a torch client optimizer so no further DeepSpeed op (CPUAdam...) is
    JIT-built. Returns timings and the final loss.
    """
    t0 = time.monotonic()
    import deepspeed  # type: ignore[import-untyped]
    import torch

    t1 = time.monotonic()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    t2 = time.monotonic()
    loss = torch.zeros(())
    for step in range(steps):
        x = torch.randn(2, 16, generator=torch.Generator().manual_seed(step))
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
    t3 = time.monotonic()
    from deepspeed.ops.op_builder.builder import OpBuilder  # type: ignore[import-untyped]

    return {
        "rank": torch.distributed.get_rank(),
        "import_s": t1 - t0,
        "initialize_s": t2 - t1,
        "steps_s": t3 - t2,
        "loss": float(loss.item()),
        "loaded_ops": sorted(OpBuilder._loaded_ops),
    }


# --------------------------------------------------------------------------
# command line (the nox partition session runs this before pytest)


def main() -> int:
    """``python -m moeconf.distributed.deepspeed_env``: :func:`prepare_deepspeed_cpu` with progress
    on stderr; a fault of the machine is one line and exit 2, not a traceback."""
    os.environ.update(deepspeed_cpu_env())

    def notice(message: str) -> None:
        print(f"moeconf: {message}", file=sys.stderr, flush=True)

    try:
        info = prepare_deepspeed_cpu(notice)
    except EnvironmentProblem as exc:
        print(f"moeconf: error: {exc}", file=sys.stderr)
        return 2
    notice(f"DeepSpeed CPU: {info.op} {'ready' if info.compatible else 'not compatible (plain gloo)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
