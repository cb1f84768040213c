"""Faults of the machine are reported as such (``setup``, exit 2), never as failures of the MoE code;
multi-rank failures say in one line what happened and where; no run dir or process outlives a run.

One section per problem:

1. a DeepSpeed build lock left by a killed build is removed before any rank starts; a lock that a
   live (or stopped) process holds is a ``setup`` fault; a failed build or import is too;
2. an unwritable extension dir / HOME / TMPDIR, no free port, a missing deepspeed, a bad
   ``MOECONF_DEADLINE_S`` are ``setup`` with one line; ranks that die of the machine are too, and a
   bug in the rank is still a failure;
3. the summary names the rank, the signal or exception and the frame; the detail is bounded;
4. run dirs: removed on SIGTERM and on a double Ctrl-C, and a SIGKILLed run's dir is removed by the
   next run (never a live run's).

Tests that launch ranks are marked ``partition`` (the default ``cpu`` session deselects them).
"""

from __future__ import annotations

import errno
import json
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

from moeconf.backends import partitioned
from moeconf.backends.base import EnvironmentFault, RankFailure
from moeconf.backends.partitioned import environment_verdict, headline, preflight
from moeconf.distributed import MultiRankResult, RankOutcome, cleanup, deepspeed_env, processes_with_env, run_ranks
from moeconf.distributed.deepspeed_env import (
    LOCK_NAME,
    SHM_COMM_OP,
    OpBuildError,
    OpBuildInfo,
    prepare_deepspeed_cpu,
)
from moeconf.distributed.environment import EnvironmentProblem, check_free_port, environment_cause
from moeconf.harness.engine import Selection, run_selection

ROOT = Path(__file__).resolve().parents[2]
RANK_FNS = "tests.reliability.env_rank_fns"
BACKENDS = "tests.reliability.env_backends"
MARKER_KEY = "MOECONF_TEST_MARKER"


# --------------------------------------------------------------------------
# helpers


@pytest.fixture
def extensions_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private ``TORCH_EXTENSIONS_DIR``; the per-process DeepSpeed preparation is forgotten
    before and after (it is cached per cache location)."""
    root = tmp_path / "torch_extensions"
    root.mkdir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    partitioned._deepspeed_ready.cache_clear()
    yield root
    partitioned._deepspeed_ready.cache_clear()


@pytest.fixture
def no_build(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stand in for the op build (a minute of compiling) and pretend deepspeed is installed; the
    list records each build request."""
    calls: list[str] = []

    def fake_ensure(
        progress: object, timeout_s: float = 600, *, builder: str = "", op: str = SHM_COMM_OP
    ) -> OpBuildInfo:
        calls.append(op)
        return OpBuildInfo(op=op, compatible=True, was_cached=True, seconds=0.0, load_s=0.0, build_dir=None)

    monkeypatch.setattr(deepspeed_env, "ensure_deepspeed_cpu_ops", fake_ensure)
    monkeypatch.setattr(partitioned, "_deepspeed_installed", lambda: True)
    return calls


def _plant_lock(extensions: Path) -> Path:
    lock = extensions / SHM_COMM_OP / LOCK_NAME
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    return lock


def _hold_lock(lock: Path) -> subprocess.Popen[bytes]:
    """A process that holds ``lock`` open, as torch's FileBaton does during a build."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    code = f"import os, sys, time; os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL); print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
    return holder


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _records(backend: str, arch: str = "mixtral") -> list:
    sel = Selection(archs=(arch,), backends=(backend,))
    return [r for group in run_selection(sel) for r in group]


def _assert_setup(records: list, *needles: str) -> str:
    """Every record is ``setup`` with the same one-line message containing ``needles``."""
    assert records and {r.status for r in records} == {"setup"}, {(r.check, r.status, r.message) for r in records}
    messages = {r.message for r in records}
    assert len(messages) == 1, messages
    message = messages.pop()
    assert "\n" not in message and "Traceback" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def _moeconf(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-m", "moeconf", *args],
        check=False,
        env=full_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _not_a_dir(tmp_path: Path) -> Path:
    """A path nobody can create, whoever runs the test (root ignores permission bits): a directory
    under a regular file."""
    blocker = tmp_path / "a-regular-file"
    blocker.write_text("")
    return blocker / "sub"


# --------------------------------------------------------------------------
# 1. DeepSpeed build locks and the up-front build


def test_stale_lock_whose_owner_is_gone_is_removed_with_a_notice(
    extensions_dir: Path, no_build: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    lock = _plant_lock(extensions_dir)  # as a Ctrl-C'd first run leaves it: nobody holds it
    preflight("zero3-leaf", uses_deepspeed=True)
    assert not lock.exists()
    assert no_build == [SHM_COMM_OP]  # built (here: stood in for) before any rank starts
    notices = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(notices) == 1 and str(lock) in notices[0] and "removed stale" in notices[0], notices
    preflight("zero3-leaf", uses_deepspeed=True)
    assert no_build == [SHM_COMM_OP]  # once per process and cache location


def test_lock_held_by_a_live_process_is_a_setup_fault_not_a_failure(extensions_dir: Path, no_build: list[str]) -> None:
    lock = extensions_dir / SHM_COMM_OP / LOCK_NAME
    holder = _hold_lock(lock)
    try:
        records = _records(f"{BACKENDS}:zero3_leaf_short_wait")  # waits 1 s for the live build
        _assert_setup(records, str(lock), f"PID {holder.pid}", "still held")
        assert lock.exists()  # a live build's lock is never removed
        holder.send_signal(signal.SIGSTOP)  # a Ctrl-Z'd build: no use waiting for it
        with pytest.raises(EnvironmentFault, match=f"held by stopped PID {holder.pid}"):
            preflight("zero3-leaf", uses_deepspeed=True, lock_wait_s=600)
    finally:
        holder.send_signal(signal.SIGCONT)
        _end(holder)
    assert no_build == []


def test_failed_build_or_import_is_a_setup_fault(extensions_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partitioned, "_deepspeed_installed", lambda: True)
    failing_build = "import sys; print('shm.cpp:1:10: fatal error: shm.h: No such file or directory'); sys.exit(1)"
    monkeypatch.setattr(deepspeed_env, "_BUILD_SNIPPET", failing_build)
    with pytest.raises(OpBuildError) as info:
        prepare_deepspeed_cpu(lambda _m: None)
    first = str(info.value).splitlines()[0]
    assert "building DeepSpeed op deepspeed_shm_comm failed" in first and "shm.h: No such file" in first
    with pytest.raises(EnvironmentFault, match="building DeepSpeed op"):
        preflight("zero3-leaf", uses_deepspeed=True)
    broken_import = (
        "import json, sys; print(json.dumps({'op': 'x', 'import_error': \"ImportError: libfoo.so\"})); sys.exit(3)"
    )
    monkeypatch.setattr(deepspeed_env, "_BUILD_SNIPPET", broken_import)
    with pytest.raises(EnvironmentFault, match="deepspeed cannot be imported .ImportError: libfoo.so"):
        preflight("zero3-leaf", uses_deepspeed=True)


# --------------------------------------------------------------------------
# 2. environment faults are `setup`, with one line


def _assert_cli_setup(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    report = json.loads(result.stdout)
    records = report["results"]
    assert records and {r["status"] for r in records} == {"setup"}, {r["status"] for r in records}
    messages = {r["message"] for r in records}
    assert len(messages) == 1, messages
    message = messages.pop()
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def test_unwritable_extensions_dir_is_setup_exit_2(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    bad = _not_a_dir(tmp_path)
    result = _moeconf(
        ["check", "--arch", "mixtral", "--backend", "zero3-leaf", "--format", "json", "--quiet"],
        {"TORCH_EXTENSIONS_DIR": str(bad)},
    )
    _assert_cli_setup(result, str(bad), "TORCH_EXTENSIONS_DIR")


def test_unwritable_home_is_setup_exit_2(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    home = _not_a_dir(tmp_path)
    env = {"HOME": str(home), "TORCH_EXTENSIONS_DIR": "", "XDG_CACHE_HOME": ""}
    result = _moeconf(["check", "--arch", "mixtral", "--backend", "zero2-dense", "--format", "json", "--quiet"], env)
    _assert_cli_setup(result, str(home), "HOME=", "TORCH_EXTENSIONS_DIR")


def test_unwritable_tmpdir_is_setup_exit_2(tmp_path: Path) -> None:
    bad = _not_a_dir(tmp_path)
    result = _moeconf(
        ["check", "--arch", "mixtral", "--backend", "fsdp2-dense", "--format", "json", "--quiet"], {"TMPDIR": str(bad)}
    )
    _assert_cli_setup(result, str(bad), "TMPDIR")


def test_missing_deepspeed_is_setup_when_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partitioned, "_deepspeed_installed", lambda: False)
    _assert_setup(_records("zero3-leaf"), "deepspeed is not installed", "pip install 'moeconf[deepspeed]'")


def test_no_free_port_is_an_environment_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: socket.socket, address: object) -> None:
        raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")

    monkeypatch.setattr(socket.socket, "bind", refuse)
    with pytest.raises(EnvironmentProblem) as info:
        check_free_port()
    assert "\n" not in str(info.value) and "127.0.0.1" in str(info.value)


def test_bad_deadline_is_one_line_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOECONF_DEADLINE_S", "soon")
    with pytest.raises(EnvironmentFault) as info:
        partitioned.ZERO3_LEAF.deadline()
    assert str(info.value) == str(info.value).splitlines()[0] and "MOECONF_DEADLINE_S='soon'" in str(info.value)
    monkeypatch.setenv("MOECONF_DEADLINE_S", "45")
    assert partitioned.ZERO3_LEAF.deadline() == 45.0  # read at each launch, not at import


def _result(status: str, outcomes: list[RankOutcome], failed_rank: int | None = None) -> MultiRankResult:
    return MultiRankResult(status, outcomes, 3.0, len(outcomes), 45.0, "m:f", 1234, failed_rank)  # type: ignore[arg-type]


def _traceback(last_line: str, func: str = "load") -> str:
    return f'Traceback (most recent call last):\n  File "/x/y.py", line 7, in {func}\n    boom()\n    ^^^^^^\n{last_line}\n'


def test_rank_deaths_of_the_machine_are_told_apart_from_bugs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ext = tmp_path / "ext"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    dirs = partitioned._machine_dirs()
    denied = f"PermissionError: [Errno 13] Permission denied: '{ext}/deepspeed_shm_comm/lock'"
    assert "TORCH_EXTENSIONS_DIR" in (environment_cause(_traceback(denied), dirs) or "")
    # The same error on a path of the code under test (its own files) is the code's.
    elsewhere = "PermissionError: [Errno 13] Permission denied: '/opt/model/experts.bin'"
    assert environment_cause(_traceback(elsewhere), dirs) is None
    assert environment_cause(_traceback("OSError: [Errno 28] No space left on device: '/data/x'"), dirs)
    assert environment_cause(_traceback("torch.distributed.DistNetworkError: EADDRINUSE address already in use"), dirs)
    assert environment_cause(_traceback("RuntimeError: expected all experts to have 4 tokens"), dirs) is None
    assert environment_cause(_traceback("ValueError: Permission denied in expert 3"), dirs) is None

    crash = _result("crash", [RankOutcome(0, 1, exception=_traceback(denied)), RankOutcome(1, -9, "SIGKILL")], 0)
    assert "rank 0 died of a fault of the machine" in (environment_verdict(crash) or "")
    baton = (
        'Current thread 0x00007f (most recent call first):\n  File "/t/torch/utils/file_baton.py", line 50 in wait\n'
    )
    waiting = _result("deadlock", [RankOutcome(r, -9, stack=baton, killed_by_launcher=True) for r in range(2)])
    assert "build lock" in (environment_verdict(waiting) or "")
    gather = (
        'Current thread 0x00007f (most recent call first):\n  File "/t/distributed_c10d.py", line 9 in all_gather\n'
    )
    hang = _result("deadlock", [RankOutcome(r, -9, stack=gather, killed_by_launcher=True) for r in range(2)])
    assert environment_verdict(hang) is None  # the code's hang stays a failure
    importing = textwrap.dedent(
        """\
        Current thread 0x00007f (most recent call first):
          File "/usr/lib/python3.11/dataclasses.py", line 433 in _create_fn
          File "/v/site-packages/torch/_inductor/codegen/simd.py", line 4532 in <module>
          File "<frozen importlib._bootstrap>", line 241 in _call_with_frames_removed
          File "/v/site-packages/deepspeed/runtime/engine.py", line 682 in __init__
          File "/m/moeconf/distributed/_rank_main.py", line 194 in main
        """
    )
    slow = _result("deadlock", [RankOutcome(r, -9, stack=importing, killed_by_launcher=True) for r in range(2)])
    assert "still importing modules" in (environment_verdict(slow) or "")
    assert "torch/_inductor/codegen/simd.py" in (environment_verdict(slow) or "")
    one_stuck = _result(
        "deadlock",
        [
            RankOutcome(0, -9, stack=importing, killed_by_launcher=True),
            RankOutcome(1, -9, stack=gather, killed_by_launcher=True),
        ],
    )
    assert environment_verdict(one_stuck) is None  # a rank in a collective: not only slowness


@pytest.mark.partition
def test_ranks_dying_of_an_unusable_dir_are_setup_and_a_bug_is_still_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(_not_a_dir(tmp_path)))
    _assert_setup(_records(f"{BACKENDS}:ranks_write_extensions_dir"), "rank 1 died of a fault of the machine")
    bug = _records(f"{BACKENDS}:ranks_raise_value_error")
    assert {r.status for r in bug} == {"fail"}
    assert any("crash: rank 1 raised ValueError: expert 3 got 5 tokens" in r.message for r in bug)


# --------------------------------------------------------------------------
# 3. one-line summaries, bounded detail

_DUMP = textwrap.dedent(
    """\
    Thread 0x00007f0000000002 (most recent call first):
      File "/usr/lib/python3.11/threading.py", line 320 in wait
      File "/usr/lib/python3.11/threading.py", line 1002 in _bootstrap

    Current thread 0x00007f0000000001 (most recent call first):
      File "/v/torch/distributed/distributed_c10d.py", line 3950 in all_gather_into_tensor
      File "/v/deepspeed/runtime/zero/partition_parameters.py", line 1200 in _all_gather
      File "/m/moeconf/distributed/_rank_main.py", line 194 in main
      File "<frozen runpy>", line 198 in _run_module_as_main
    """
)


def test_hang_summary_names_each_rank_and_its_frame() -> None:
    outcomes = [RankOutcome(r, -9, stack=_DUMP, killed_by_launcher=True) for r in range(2)]
    line = headline(_result("deadlock", outcomes))
    assert line.startswith("hang: ranks [0, 1] still running after 45 s (rank 0 in all_gather_into_tensor at ")
    assert "distributed_c10d.py:3950; rank 1 in all_gather_into_tensor" in line and "\n" not in line


def test_crash_summary_names_rank_exception_and_frame() -> None:
    raised = RankOutcome(1, 1, exception=_traceback("ValueError: bad routing " + "x" * 2000, func="route"))
    line = headline(_result("crash", [RankOutcome(0, -9, killed_by_launcher=True), raised], 1))
    assert line.startswith("crash: rank 1 raised ValueError: bad routing") and "\n" not in line
    assert len(line) <= partitioned.HEADLINE_MAX
    disagreement = RankOutcome(
        1, 1, exception=_traceback("RuntimeError: disagreement between rank0 and rank1: \n rank0: 14 \n rank1: 12")
    )
    assert (
        "raised RuntimeError: disagreement between rank0 and rank1: rank0: 14 rank1: 12 (in load at y.py:7)"
        in headline(_result("crash", [RankOutcome(0, 1), disagreement], 1))
    )
    killed = headline(_result("crash", [RankOutcome(0, 0), RankOutcome(1, -11, "SIGSEGV", stderr_tail=_DUMP)], 1))
    assert killed == "crash: rank 1 killed by SIGSEGV (in all_gather_into_tensor at distributed_c10d.py:3950)"


def test_detail_keeps_every_stack_once_and_bounds_the_logs() -> None:
    exception = _traceback("ValueError: bad routing")
    repeated = "FutureWarning: all_gather_into_tensor is deprecated\n" * 300
    noisy = repeated + "\n".join(f"[W] warning number {i}" for i in range(500)) + "\n" + exception
    outcomes = [
        RankOutcome(0, -9, stack=_DUMP, stderr_tail=noisy, killed_by_launcher=True),
        RankOutcome(1, 1, exception=exception, stderr_tail=noisy),
    ]
    report = _result("crash", outcomes, 1).report()
    assert report.count("all_gather_into_tensor") == 1  # rank 0's stack, once
    assert report.count("ValueError: bad routing") == 2  # rank 1's exception; rank 0 printed it too
    assert "--- rank 0" in report and "--- rank 1" in report
    assert "warning number 499" in report and "warning number 400" not in report
    assert report.count("FutureWarning") <= 2 and "repeated lines left out" in report
    assert "^^^" not in report
    assert len(report.splitlines()) < 120


# --------------------------------------------------------------------------
# 4. run dirs and processes never outlive a run


def _run_dir_name(pid: int, start: int) -> str:
    return f"{cleanup.RUN_DIR_PREFIX}{cleanup._pid_namespace()}.{pid}.{start}-{uuid.uuid4().hex[:8]}"


def _dead_pid() -> tuple[int, int]:
    """PID and start time of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    start = cleanup._start_time(proc.pid)
    assert start is not None
    proc.kill()
    proc.wait()
    return proc.pid, start


def _fake_leftovers(root: Path) -> tuple[Path, Path, Path, Path]:
    pid, start = _dead_pid()
    dead = root / _run_dir_name(pid, start)
    me = os.getpid()
    live = root / _run_dir_name(me, cleanup._start_time(me) or 0)
    recycled = root / _run_dir_name(me, (cleanup._start_time(me) or 0) + 1)  # our PID, an older owner
    legacy = root / "moeconf-ranks-abc123"  # no owner in the name: not ours to judge
    for path in (dead, live, recycled, legacy):
        path.mkdir()
        (path / "rank0.stderr.txt").write_text("log")
    return dead, live, recycled, legacy


def test_sweep_removes_only_dirs_whose_owner_is_gone(tmp_path: Path) -> None:
    dead, live, recycled, legacy = _fake_leftovers(tmp_path)
    assert sorted(cleanup.sweep_orphaned_run_dirs(tmp_path)) == sorted([dead, recycled])
    assert live.exists() and legacy.exists() and not dead.exists() and not recycled.exists()


@pytest.mark.partition
def test_next_run_removes_a_dead_runs_dir_and_keeps_a_live_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead, live, _recycled, legacy = _fake_leftovers(tmp_path)
    result = run_ranks(f"{RANK_FNS}:return_rank", world_size=2, deadline_s=60, backend=None)
    assert result.status == "ok", result.report()
    assert not dead.exists() and live.exists() and legacy.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, legacy.name])  # its own dir is gone too


_PARENT = textwrap.dedent(
    """
    import sys
    from moeconf.distributed import run_ranks
    print("parent-started", flush=True)
    run_ranks(sys.argv[1], world_size=2, deadline_s=300, backend=None)
    """
)


def _start_parent(marker: str, tmpdir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, MARKER_KEY: marker, "TMPDIR": str(tmpdir), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", _PARENT, f"{RANK_FNS}:sleep_in_rank"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_for_ranks(marker: str, parent: subprocess.Popen[bytes], tmpdir: Path) -> None:
    """Parent + 2 ranks carry the marker, and the run dir exists."""
    deadline = time.monotonic() + 60
    while len(processes_with_env(MARKER_KEY, marker)) < 3 or not list(tmpdir.iterdir()):
        assert parent.poll() is None, parent.communicate()[0].decode()
        assert time.monotonic() < deadline, "ranks did not start"
        time.sleep(0.1)
    time.sleep(0.5)


def _gone(marker: str, timeout_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := processes_with_env(MARKER_KEY, marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.mark.partition
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT twice"])
def test_terminated_parent_leaves_no_run_dir_and_no_process(how: str, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    parent = _start_parent(marker, tmp_path)
    try:
        _wait_for_ranks(marker, parent, tmp_path)
        if how == "SIGTERM":
            parent.send_signal(signal.SIGTERM)
        else:  # the second Ctrl-C lands while the first one's cleanup runs
            parent.send_signal(signal.SIGINT)
            time.sleep(0.02)
            parent.send_signal(signal.SIGINT)
        out, _ = parent.communicate(timeout=30)
    finally:
        _end(parent)
    if how == "SIGTERM":
        assert parent.returncode == -signal.SIGTERM, out.decode()  # dies of the signal, as before
    assert _gone(marker) == []
    assert list(tmp_path.iterdir()) == [], out.decode()


@pytest.mark.partition
def test_sigkilled_parents_run_dir_is_removed_by_the_next_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = uuid.uuid4().hex
    parent = _start_parent(marker, tmp_path)
    try:
        _wait_for_ranks(marker, parent, tmp_path)
        parent.kill()  # nothing can clean up: the ranks die of PR_SET_PDEATHSIG, the dir stays
        parent.wait()
    finally:
        _end(parent)
    assert _gone(marker) == []
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].name.startswith(cleanup.RUN_DIR_PREFIX)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = run_ranks(f"{RANK_FNS}:return_rank", world_size=2, deadline_s=60, backend=None)
    assert result.status == "ok", result.report()
    assert list(tmp_path.iterdir()) == []


def test_rank_failure_summary_is_one_line() -> None:
    """The backend raises RankFailure with the headline as summary and the report as detail."""
    outcomes = [RankOutcome(r, -9, stack=_DUMP, killed_by_launcher=True) for r in range(2)]
    result = _result("deadlock", outcomes)
    exc = RankFailure("hang", headline(result), result.report())
    assert "\n" not in exc.summary and exc.detail.count("--- rank") == 2
