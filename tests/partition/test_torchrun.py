"""The rank jobs under an outside launcher (torchrun, deepspeed, srun): the environment is read as each
launcher sets it, a hang raises within the group's timeout, the in-group backend turns every rank's
outcome into the same observation or the same failure, and under torchrun two simulated nodes give
the same records as ``moeconf check`` with moeconf's own launcher (``zero3-leaf``, ``ep-alltoall``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist

from moeconf.backends.base import RankFailure, StepObservation
from moeconf.backends.ep_alltoall import (
    EP_ALLTOALL,
    EP_ALLTOALL_4,
    EP_NO_COUNT_EXCHANGE,
    EP_WRONG_SPLITS,
    ep_observations,
    ep_reason,
)
from moeconf.backends.ep_rank import EPJob, EPResult
from moeconf.backends.partitioned import ZERO3_LEAF
from moeconf.distributed import free_port
from moeconf.distributed.torchrun import (
    SLURM_PORT_BASE,
    LaunchEnvError,
    comm_backend,
    export,
    first_host,
    read_launch_env,
)
from moeconf.partition import backend as in_group
from moeconf.partition.backend import InGroupBackend, world_refusal
from moeconf.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
ARCHS = ("mixtral", "qwen3_moe", "deepseek_v3")
# Under transformers 4.x these entries are per-expert ModuleLists, which ep-alltoall declares unsupported.
EP_UNSUPPORTED = next((f"{a}: {r}" for a in ARCHS if (r := ep_reason(REGISTRY[a])) is not None), None)

SRUN_ENV = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS_PER_NODE": "4(x2)",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_JOB_ID": "123456",
}


# --- the environment (no process group) --------------------------------------------------------


def test_srun_variables_map_to_torch_ones() -> None:
    launch = read_launch_env(SRUN_ENV)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size) == (5, 8, 1, 4)
    assert launch.master_addr == "gpu07" and launch.source == "slurm"
    assert launch.master_port == SLURM_PORT_BASE + 123456 % 20000  # the same on every task of the job
    env = dict(SRUN_ENV)
    export(launch, env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu07",
    }


def test_torch_variables_win_over_slurm_ones() -> None:
    """torchrun (or deepspeed) started by srun: its RANK is the rank of the job."""
    env = {**SRUN_ENV, "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "7"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.master_addr, launch.master_port, launch.source) == (
        2,
        4,
        "h",
        7,
        "torch",
    )


def test_deepspeed_launcher_variables() -> None:
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_SIZE": "2",
        "MASTER_ADDR": "w0",
        "MASTER_PORT": "29500",
    }
    launch = read_launch_env(env)
    assert (launch.rank, launch.local_rank, launch.local_world_size, launch.source) == (3, 1, 2, "torch")


def test_explicit_master_under_srun_is_kept() -> None:
    launch = read_launch_env({**SRUN_ENV, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"})
    assert (launch.master_addr, launch.master_port) == ("10.0.0.1", 29400)


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("n1", "n1"), ("a1,a2", "a1"), ("gpu[03-05,09],cpu1", "gpu03"), ("rack1-node[2,4]", "rack1-node2")],
)
def test_first_host_of_a_nodelist(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({}, "neither RANK"),
        ({"RANK": "0"}, "WORLD_SIZE is not set"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "outside a world of 2"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"}, "SLURM_JOB_ID is not set"),
    ],
)
def test_unusable_environment_is_one_line(env: dict[str, str], says: str) -> None:
    with pytest.raises(LaunchEnvError, match=says):
        read_launch_env(env)


def test_comm_backend_follows_the_device() -> None:
    assert [comm_backend(d) for d in ("cpu", "cuda", "npu")] == ["gloo", "nccl", "hccl"]


def _partition(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moeconf.partition", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
    )


def test_refusals_before_any_group_forms() -> None:
    """Usage errors exit 2 with one line, before any rendezvous (nothing waits on a peer)."""
    plain = {k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID")}
    no_launcher = subprocess.run(
        [sys.executable, "-m", "moeconf.partition", "check", "--arch", "mixtral", "--backend", "zero3-leaf"],
        cwd=ROOT,
        env=plain,
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
    )
    assert no_launcher.returncode == 2 and "neither RANK" in no_launcher.stderr
    one_rank = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    single = _partition(["check", "--arch", "mixtral", "--backend", "hf-eager"], one_rank)
    assert single.returncode == 2 and "not a multi-rank backend" in single.stderr
    pinned = _partition(["check", "--arch", "mixtral", "--backend", "ep-alltoall-4"], one_rank)
    assert pinned.returncode == 2 and "ep-alltoall-4 runs on 4 ranks and this job has 1" in pinned.stderr


# --- the in-group backend, one process standing for rank 0 of 2 (no group) --------------------

PEER_TIMED_OUT = "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Timed out waiting 5000ms"


@pytest.fixture
def two_ranks(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """This process is rank 0 of 2; ``all_gather_object`` gathers its outcome with the rank-1 outcome
    the test appends (or raises the exception it appends)."""
    peer: list[object] = []

    def gather(out: list[object], mine: object) -> None:
        if isinstance(peer[0], BaseException):
            raise peer[0]
        out[:] = [mine, peer[0]]

    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", gather)
    return peer


def _ep_result(rank: int, steps: bool) -> EPResult:
    """A rank's result with a sentinel for its one case's observation (nothing here reads it)."""
    case: Any = object()
    step = StepObservation(torch.full((1, 2), float(rank)), {"router": torch.ones(2)}, (), {"router": torch.ones(2)})
    return EPResult(rank, [case], [[]], [step] if steps else None, [[torch.zeros(1), torch.ones(1)]] if steps else None)


def _session_args() -> tuple[list[Any], Any]:
    """One case and the steps as the in-group backend reads them (their entry and dtype only)."""
    entry = REGISTRY["mixtral"]
    return [SimpleNamespace(entry=entry, dtype=torch.float32)], SimpleNamespace(entry=entry, batches=[[]])


def _session(backend: InGroupBackend) -> tuple[object, object]:
    return backend.run_session(*_session_args())


def test_in_group_ep_runs_the_local_job_and_assembles_its_observation(
    two_ranks: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs: list[EPJob] = []
    mine, peer = _ep_result(0, True), _ep_result(1, True)

    def run(job: EPJob) -> EPResult:
        jobs.append(job)
        return mine

    monkeypatch.setattr(in_group, "run_ep_job", run)
    two_ranks.append(peer)
    backend = InGroupBackend(EP_WRONG_SPLITS)
    observations, steps_obs = _session(backend)
    requests, steps = _session_args()
    assert jobs == [EP_WRONG_SPLITS.job(requests, steps)] and jobs[0].bug == "wrong-splits"
    assert (observations, steps_obs) == ep_observations([mine, peer], steps)
    assert observations == mine.cases  # rank 0 gathered the whole batch
    # the local EP backend's make_steps replicas (2), not the job's ranks; the partitioned ones: the job's
    assert backend.steps_world_size is None and InGroupBackend(ZERO3_LEAF).steps_world_size == 2


@pytest.mark.parametrize("local", [EP_ALLTOALL, EP_NO_COUNT_EXCHANGE])
def test_a_rank_that_raised_fails_every_rank_with_its_traceback(
    two_ranks: list[object], monkeypatch: pytest.MonkeyPatch, local: object
) -> None:
    def crash(job: EPJob) -> EPResult:
        raise ValueError("split sizes do not add up\nsecond line")

    monkeypatch.setattr(in_group, "run_ep_job", crash)
    two_ranks.append(in_group._Failed(1, "RuntimeError: peer", "Traceback ... RuntimeError: peer"))
    backend = InGroupBackend(local)  # type: ignore[arg-type]
    with pytest.raises(RankFailure) as failure:
        _session(backend)
    assert (
        failure.value.kind == "crash"
        and failure.value.summary == "crash: rank 0 raised ValueError: split sizes do not add up"
    )
    assert "--- rank 0 ---" in failure.value.detail and "--- rank 1 ---" in failure.value.detail
    assert "raise ValueError" in failure.value.detail and backend.broken is None  # a crash leaves the group usable


def test_a_collective_timeout_is_a_hang_and_later_sessions_do_not_run(
    two_ranks: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(in_group, "run_ep_job", lambda job: _ep_result(0, False))
    two_ranks.append(in_group._Failed(1, PEER_TIMED_OUT, "Traceback ..."))
    backend = InGroupBackend(EP_NO_COUNT_EXCHANGE)
    with pytest.raises(RankFailure) as failure:
        _session(backend)
    assert failure.value.kind == "hang" and failure.value.summary.startswith("hang: rank 1 raised RuntimeError")
    with pytest.raises(RankFailure, match="not run: a collective of an earlier launch timed out"):
        _session(backend)


def test_an_exchange_that_fails_is_a_hang_on_this_rank(
    two_ranks: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(in_group, "run_ep_job", lambda job: _ep_result(0, False))
    two_ranks.append(RuntimeError(PEER_TIMED_OUT))
    backend = InGroupBackend(EP_ALLTOALL)
    with pytest.raises(RankFailure) as failure:
        _session(backend)
    assert failure.value.kind == "hang" and "rank 0 could not exchange results" in failure.value.summary
    assert backend.broken is not None


def test_only_a_backend_named_for_its_world_is_refused_on_another() -> None:
    assert world_refusal("ep-alltoall-4", EP_ALLTOALL_4, 4) is None
    assert world_refusal("ep-alltoall-4", EP_ALLTOALL_4, 2) == (
        "ep-alltoall-4 runs on 4 ranks and this job has 2: launch 4 ranks, or use ep-alltoall (it runs on the job's ranks)"
    )
    for name, local in (
        ("ep-alltoall", EP_ALLTOALL),
        ("ep-alltoall-wrong-splits", EP_WRONG_SPLITS),
        ("zero3-leaf", ZERO3_LEAF),
    ):
        assert world_refusal(name, local, 3) is None


# --- under torchrun ----------------------------------------------------------------------------

HANG = """
import sys, time
import torch, torch.distributed as dist
from moeconf.distributed.torchrun import init_from_env
init_from_env("cpu", float(sys.argv[1]))
start = time.monotonic()
if dist.get_rank() == 0:
    try:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    except RuntimeError as exc:
        print(f"raised after {time.monotonic() - start:.1f} s: {str(exc).splitlines()[0]}", flush=True)
        sys.exit(3)
else:
    time.sleep(float(sys.argv[1]) * 4)
"""


def _torchrun(nnodes: int, nproc: int, endpoint: str, rest: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nnodes),
        "--nproc-per-node",
        str(nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        endpoint,
        *rest,
    ]


@pytest.mark.partition
def test_a_collective_that_never_completes_raises_within_the_group_timeout(tmp_path: Path) -> None:
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    cmd = _torchrun(1, 2, f"127.0.0.1:{free_port()}", ["--max-restarts", "0", str(script), "5"])
    start = time.monotonic()
    done = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "raised after" in done.stdout, done.stdout + done.stderr[-2000:]
    assert time.monotonic() - start < 120


Records = dict[tuple[str, str, str], str]


def _nodes_under_torchrun(
    tmp_path: Path,
    nnodes: int,
    nproc: int,
    backend: str,
    more: tuple[str, ...] = ("--arch", *ARCHS, "--config", "tiny"),
    exit_code: int = 0,
) -> tuple[list[dict[str, Any]], float]:
    """``moeconf.partition check --backend backend *more`` on ``nnodes`` simulated nodes x ``nproc`` ranks
    (one torchrun agent per node, all on this machine): rank 0's report's records and the wall time.
    Every agent must exit ``exit_code`` and exactly one report be written."""
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    outputs = [tmp_path / f"node{n}.json" for n in range(nnodes)]
    start = time.monotonic()
    nodes = [
        subprocess.Popen(
            _torchrun(
                nnodes,
                nproc,
                endpoint,
                [
                    "--node-rank",  # NOTE: c10d ignores it (it ranks the agents by arrival); given as a user would
                    str(n),
                    "-m",
                    "moeconf.partition",
                    "check",
                    *more,
                    "--backend",
                    backend,
                    "--format",
                    "json",
                    "--output",
                    str(outputs[n]),
                    "--quiet",
                ],
            ),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in range(nnodes)
    ]
    logs = []
    try:
        for node in nodes:
            logs.append(node.communicate(timeout=900)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    seconds = time.monotonic() - start
    assert [node.returncode for node in nodes] == [exit_code] * nnodes, "\n".join(log[-3000:] for log in logs)
    written = [p for p in outputs if p.exists()]
    assert len(written) == 1, f"reports written: {written}"
    return json.loads(written[0].read_text())["results"], seconds


def _statuses(records: list[dict[str, Any]]) -> Records:
    return {(r["arch"], r["case"], r["check"]): r["status"] for r in records}


def _local_launcher(backend: str) -> tuple[Records, float]:
    """The same selection with moeconf's own launcher (``moeconf check``'s engine)."""
    from moeconf.harness.engine import Selection, run_selection

    start = time.monotonic()
    sel = Selection(archs=ARCHS, backends=(backend,))
    local: Records = {(r.arch, r.case, r.check): r.status for group in run_selection(sel) for r in group}
    return local, time.monotonic() - start


@pytest.mark.partition
def test_two_nodes_under_torchrun_give_the_local_launchers_records(tmp_path: Path) -> None:
    """2 simulated nodes x 2 ranks (4 ranks, ZeRO-3 sharded over 4) against ``moeconf check``'s
    2 local ranks: the same status for every (arch, case, check); rank 0 alone writes the report."""
    pytest.importorskip("deepspeed")
    records, torchrun_s = _nodes_under_torchrun(tmp_path, 2, 2, "zero3-leaf")
    remote = _statuses(records)
    local, local_s = _local_launcher("zero3-leaf")
    assert remote == local
    assert {a for a, _, _ in remote} == set(ARCHS) and any(c == "adversarial_steps" for _, c, _ in remote)
    print(f"torchrun 2x2: {torchrun_s:.0f} s; local launcher 2 ranks: {local_s:.0f} s")


@pytest.mark.partition
@pytest.mark.skipif(EP_UNSUPPORTED is not None, reason=f"ep-alltoall does not run here ({EP_UNSUPPORTED})")
def test_expert_parallel_on_two_nodes_under_torchrun_gives_the_local_launchers_records(tmp_path: Path) -> None:
    """``ep-alltoall`` on 2 simulated nodes x 2 ranks: experts and tokens split over the job's 4
    ranks, dispatched with all_to_all across the "nodes", against ``ep-alltoall-4`` on 4 local
    ranks: the same status for every (arch, case, check)."""
    records, torchrun_s = _nodes_under_torchrun(tmp_path, 2, 2, "ep-alltoall")
    remote = _statuses(records)
    local, local_s = _local_launcher("ep-alltoall-4")
    assert remote == local
    assert {a for a, _, _ in remote} == set(ARCHS) and any(c == "adversarial_steps" for _, c, _ in remote)
    assert any(status == "pass" for status in remote.values())
    print(f"torchrun 2x2 ep-alltoall: {torchrun_s:.0f} s; local launcher ep-alltoall-4: {local_s:.0f} s")


@pytest.mark.partition
@pytest.mark.skipif(EP_UNSUPPORTED is not None, reason=f"ep-alltoall does not run here ({EP_UNSUPPORTED})")
def test_an_expert_parallel_negative_control_under_torchrun_is_caught(tmp_path: Path) -> None:
    """``ep-alltoall-wrong-splits``: gloo refuses the all-to-all on some rank; every rank hears of it
    through the results' all-gather and records the same ``crash`` (exit 1 everywhere, a report)."""
    records, _ = _nodes_under_torchrun(
        tmp_path, 1, 2, "ep-alltoall-wrong-splits", ("--arch", "mixtral", "--case", "random"), exit_code=1
    )
    assert records and all(r["status"] == "fail" for r in records)
    assert "crash: rank" in records[0]["message"] and "inLengthPerRank" in records[0]["message"]
