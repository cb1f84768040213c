"""Tests of moeconf.distributed.run_ranks: ok / deadlock / crash paths, cleanup,
and stale torch-extension lock detection.

Every run carries a unique env marker; after each run we scan /proc for
processes whose environment carries it (no psutil needed) and check that the
MASTER_PORT has no listener left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from moeconf.distributed import MultiRankResult, processes_with_env, run_ranks
from moeconf.distributed.deepspeed_env import (
    SHM_COMM_OP,
    StaleBuildLockError,
    ensure_deepspeed_cpu_ops,
    extensions_root,
    find_stale_locks,
)

from . import rank_fns

MARKER_KEY = "MOECONF_TEST_MARKER"
DEADLINE_S = 8.0


# --------------------------------------------------------------------------
# helpers


@pytest.fixture
def marker() -> str:
    return uuid.uuid4().hex


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Route the launcher's temp dirs into an empty folder and check that it is
    empty again afterwards (no leaked temp files)."""
    tmp = tmp_path / "launcher-tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield tmp
    assert sorted(p.name for p in tmp.iterdir()) == []


def _listening(port: int) -> bool:
    """Is anything LISTENing on ``port`` (IPv4 or IPv6)? Read from /proc/net."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _port_bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # TIME_WAIT from the just-closed store connections is fine; a live
        # listener is not (SO_REUSEADDR doesn't allow binding over it).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_gone(marker: str, timeout_s: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = processes_with_env(MARKER_KEY, marker)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def assert_cleaned_up(result: MultiRankResult, marker: str) -> None:
    # run_ranks returns only after everything is dead: no waiting here.
    assert processes_with_env(MARKER_KEY, marker) == [], result.report()
    assert result.master_port is not None
    assert not _listening(result.master_port)
    assert _port_bindable(result.master_port)


def _run(
    fn: object,
    args: tuple[object, ...] = (),
    *,
    marker: str,
    deadline_s: float = 30,
    env_extra: dict[str, str] | None = None,
    world_size: int = 2,
) -> MultiRankResult:
    env = {MARKER_KEY: marker, **(env_extra or {})}
    return run_ranks(fn, args, deadline_s=deadline_s, env=env, world_size=world_size)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# launcher


def test_ok_returns_results_by_rank(marker: str) -> None:
    result = _run(rank_fns.allreduce_ok, (2.0,), marker=marker, world_size=3)
    assert result.status == "ok", result.report()
    assert [r["rank"] for r in result.results] == [0, 1, 2]
    assert [r["local_rank"] for r in result.results] == [0, 1, 2]
    assert all(r["world_size"] == 3 for r in result.results)
    assert all(r["sum"] == 2.0 * (1 + 2 + 3) for r in result.results)
    assert_cleaned_up(result, marker)


def test_string_spec_and_env_plumbing(marker: str) -> None:
    names = ("MASTER_ADDR", "WORLD_SIZE", "LOCAL_WORLD_SIZE", MARKER_KEY)
    result = _run(f"{rank_fns.__name__}:return_env", names, marker=marker)
    assert result.status == "ok", result.report()
    for env in result.results:
        assert env == {
            "MASTER_ADDR": "127.0.0.1",
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            MARKER_KEY: marker,
        }
    assert_cleaned_up(result, marker)


def test_retries_when_master_port_was_taken(marker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from moeconf.distributed import launcher

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        real_free_port = launcher.free_port
        ports = iter([taken])
        # first pick collides (as if another process grabbed it meanwhile)
        monkeypatch.setattr(launcher, "free_port", lambda: next(ports, None) or real_free_port())
        result = _run(rank_fns.allreduce_ok, (1.0,), marker=marker)
    assert result.status == "ok", result.report()
    assert result.master_port != taken
    assert f"port {taken} was taken" in result.message
    assert_cleaned_up(result, marker)


def test_rejects_unimportable_fn() -> None:
    with pytest.raises(ValueError, match="not importable"):
        run_ranks(lambda: None)
    with pytest.raises(ValueError, match="pkg.module:attr|package.module:attr"):
        run_ranks("no_colon_here")


def test_deadlock_reports_every_rank_stack(marker: str) -> None:
    start = time.monotonic()
    result = _run(rank_fns.deadlock_fn, marker=marker, deadline_s=DEADLINE_S)
    took = time.monotonic() - start
    assert result.status == "deadlock", result.report()
    assert DEADLINE_S <= took < DEADLINE_S + 10
    assert result.elapsed_s >= DEADLINE_S
    stacks = result.stacks
    assert all(s and "deadlock_fn" in s for s in stacks), result.report()
    assert "_never_joins_collective" in (stacks[0] or "")
    assert "_stuck_in_all_reduce" in (stacks[1] or "")
    assert all(o.killed_by_launcher for o in result.outcomes)
    report = result.report()
    assert "DEADLOCK" in report and "_never_joins_collective" in report
    assert "_stuck_in_all_reduce" in report
    assert_cleaned_up(result, marker)


def test_sigkilled_rank_is_a_crash(marker: str) -> None:
    start = time.monotonic()
    result = _run(rank_fns.sigkill_on_rank1, marker=marker, deadline_s=60)
    assert time.monotonic() - start < 10
    assert result.status == "crash", result.report()
    assert result.failed_rank == 1
    assert result.outcomes[1].signal == "SIGKILL"
    assert result.outcomes[1].exitcode == -signal.SIGKILL
    # rank 0 was blocked in all_reduce: either its stack was dumped or gloo
    # already raised "connection closed/reset" - both must be in the report.
    rank0 = result.outcomes[0]
    assert (rank0.stack or "") + (rank0.exception or "")
    assert "SIGKILL" in result.report()
    assert_cleaned_up(result, marker)


def test_exception_is_reported_with_traceback(marker: str) -> None:
    result = _run(rank_fns.raise_on_rank1, marker=marker, deadline_s=60)
    assert result.status == "crash", result.report()
    assert result.failed_rank == 1
    exc = result.outcomes[1].exception
    assert exc and "RankFailure: boom from rank 1" in exc and "_explode" in exc
    assert result.outcomes[1].exitcode == 1 and result.outcomes[1].signal is None
    assert "boom from rank 1" in result.report()
    assert_cleaned_up(result, marker)


def test_grandchildren_are_killed(marker: str, tmp_path: Path) -> None:
    pid_file = str(tmp_path / "grandchild.pid")
    result = _run(rank_fns.grandchild_then_hang, (pid_file,), marker=marker, deadline_s=DEADLINE_S)
    assert result.status == "deadlock", result.report()
    assert all("_hang_after_spawning_grandchild" in (s or "") for s in result.stacks)
    for rank in range(2):
        pid = int(Path(f"{pid_file}.{rank}").read_text())
        state = _proc_state(pid)
        assert state in (None, "Z"), f"grandchild sleep {pid} survived (state {state})"
    assert_cleaned_up(result, marker)


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()[0]


# --------------------------------------------------------------------------
# parent interrupted / killed


_PARENT_SCRIPT = textwrap.dedent(
    """
    import sys
    from moeconf.distributed import run_ranks
    print("parent-started", flush=True)
    run_ranks(sys.argv[1], deadline_s=120)
    """
)


def _start_parent(marker: str, tmpdir: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        MARKER_KEY: marker,
        "TMPDIR": str(tmpdir),
        "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path),
    }
    spec = f"{rank_fns.__name__}:deadlock_fn"
    return subprocess.Popen(
        [sys.executable, "-c", _PARENT_SCRIPT, spec],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_ranks_up(marker: str, parent: subprocess.Popen[bytes], n: int = 3) -> None:
    """Parent + 2 ranks carry the marker; wait until all are there."""
    deadline = time.monotonic() + 20
    while len(processes_with_env(MARKER_KEY, marker)) < n:
        assert parent.poll() is None, parent.communicate()[0].decode()
        assert time.monotonic() < deadline, "ranks did not start"
        time.sleep(0.1)
    time.sleep(1.0)  # let the ranks get into torch import / init


def test_keyboard_interrupt_in_parent_cleans_up(marker: str, tmp_path: Path) -> None:
    tmpdir = tmp_path / "parent-tmp"
    tmpdir.mkdir()
    parent = _start_parent(marker, tmpdir)
    try:
        _wait_ranks_up(marker, parent)
        parent.send_signal(signal.SIGINT)
        out, _ = parent.communicate(timeout=15)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    assert b"KeyboardInterrupt" in out, out.decode()
    assert _wait_gone(marker, timeout_s=1) == []
    assert list(tmpdir.iterdir()) == []


def test_sigkilled_parent_leaves_no_orphan_ranks(marker: str, tmp_path: Path) -> None:
    tmpdir = tmp_path / "parent-tmp"
    tmpdir.mkdir()
    parent = _start_parent(marker, tmpdir)
    try:
        _wait_ranks_up(marker, parent)
        parent.kill()  # no cleanup code can run: PR_SET_PDEATHSIG must do it
        parent.wait()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    assert _wait_gone(marker, timeout_s=5) == []


# --------------------------------------------------------------------------
# torch-extension build locks (no deepspeed needed)


def test_stale_lock_detection_on_fabricated_dir(tmp_path: Path) -> None:
    root = tmp_path / "torch_extensions"
    # torch's default layout (<root>/py311_cpu/<op>/lock) and the
    # TORCH_EXTENSIONS_DIR layout (<root>/<op>/lock) are both searched.
    held = root / "py311_cpu" / "op_being_built" / "lock"
    dead = root / "op_killed_midway" / "lock"
    for lock in (held, dead):
        lock.parent.mkdir(parents=True)
    fd = os.open(held, os.O_CREAT | os.O_EXCL)  # like torch's FileBaton
    try:
        dead.touch()
        assert find_stale_locks(root) == [dead]
    finally:
        os.close(fd)
    # the builder holding `held` died without removing it
    assert find_stale_locks(root) == sorted([held, dead])
    assert find_stale_locks(tmp_path / "missing") == []


def test_ensure_ops_refuses_stale_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / SHM_COMM_OP / "lock"
    lock.parent.mkdir()
    lock.touch()
    assert extensions_root() == tmp_path
    with pytest.raises(StaleBuildLockError) as info:
        ensure_deepspeed_cpu_ops(progress=lambda _msg: None)
    message = str(info.value)
    assert "\n" not in message
    assert str(lock) in message and f"rm {lock}" in message


# --------------------------------------------------------------------------
# DeepSpeed ZeRO-2 on CPU through run_ranks


def test_deepspeed_zero2_cpu_init(marker: str) -> None:
    pytest.importorskip("deepspeed")
    root = extensions_root()
    built = any(root.glob(f"{SHM_COMM_OP}/*.so")) or any(root.glob(f"*/{SHM_COMM_OP}/*.so"))
    if not built and not os.environ.get("MOECONF_BUILD_DS_OPS"):
        pytest.skip(
            f"{SHM_COMM_OP} not built yet (~1 min): run "
            "moeconf.distributed.deepspeed_env.ensure_deepspeed_cpu_ops() or set MOECONF_BUILD_DS_OPS=1"
        )
    messages: list[str] = []
    info = ensure_deepspeed_cpu_ops(progress=messages.append, timeout_s=600)
    assert info.op == SHM_COMM_OP and messages
    result = _run(
        "moeconf.distributed.deepspeed_env:zero_init_probe",
        (2, 2),
        marker=marker,
        deadline_s=90,
        env_extra={"DS_ACCELERATOR": "cpu"},
    )
    assert result.status == "ok", result.report()
    losses = {r["loss"] for r in result.results}
    assert len(losses) == 1  # ranks agree after partitioned steps
    if info.compatible:
        assert all(SHM_COMM_OP in r["loaded_ops"] for r in result.results)
    assert_cleaned_up(result, marker)
