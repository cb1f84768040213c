"""Rank pools (``moeconf.distributed.launcher.RankPool``): ranks that stay up job after job.

Kept to few launches (each costs ~10-20 s of imports per rank on the 2-core runner): one pool of
the real ZeRO-3 leaf backend runs two architectures; one light gloo pool runs the failure cases.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import pytest
import torch.distributed as dist

from moeconf.backends.partitioned import ZERO3_LEAF
from moeconf.distributed import processes_with_env
from moeconf.distributed.launcher import RUN_ID_ENV, RankPool, close_pools, idle_pools
from moeconf.harness.engine import Selection, run_selection
from moeconf.harness.partition_checks import STEPS_CASE

pytestmark = pytest.mark.partition

# a backend of its own, so that its pool is told apart from any other test's
POOL_ZERO3_LEAF = dataclasses.replace(ZERO3_LEAF, name="zero3-leaf-pool-test")


# -- rank functions (module level: the ranks import them) --------------------


def pid_and_rank() -> tuple[int, int]:
    return os.getpid(), dist.get_rank()


def rank1_hangs() -> None:
    """Rank 1 never reaches the collective rank 0 waits in."""
    if dist.get_rank() == 1:
        while True:
            time.sleep(1)
    dist.barrier()


def rank1_raises() -> None:
    if dist.get_rank() == 1:
        raise ValueError("seeded failure in job 4")
    dist.barrier()


# -- tests -------------------------------------------------------------------


def _pool_of(name: str) -> RankPool:
    pools = [p for key, p in idle_pools().items() if isinstance(key, tuple) and name in key]
    assert len(pools) == 1, idle_pools()
    return pools[0]


def test_several_archs_run_in_one_pool() -> None:
    pytest.importorskip("deepspeed")
    archs = ("mixtral", "qwen3_moe")
    sel = Selection(
        archs=archs, backends=("tests.partition.test_rank_pool:POOL_ZERO3_LEAF",), cases=("random", STEPS_CASE)
    )
    pids_after: dict[str, list[int]] = {}
    records = []
    try:
        for group in run_selection(sel):
            records += group
            arch = group[0].arch
            if group[0].case == STEPS_CASE:  # the arch's session is over: its pool is idle
                pids_after[arch] = _pool_of(POOL_ZERO3_LEAF.name).pids
        pool = _pool_of(POOL_ZERO3_LEAF.name)
        assert pool.launches == 1
        assert pids_after["mixtral"] == pids_after["qwen3_moe"] and len(pids_after["mixtral"]) == 2
        bad = [(r.arch, r.case, r.check, r.status, r.message) for r in records if r.status not in ("pass", "skip")]
        assert not bad
        assert {r.arch for r in records if r.status == "pass"} == set(archs)
        run_id = pool.run_id
    finally:
        close_pools()
    assert run_id and processes_with_env(RUN_ID_ENV, run_id) == []


def test_failed_job_ends_its_pool_and_the_next_job_gets_a_fresh_one() -> None:
    pool = RankPool(world_size=2)
    run_ids = []
    try:
        # job 1 from a thread that ends: the engine runs each call on a short-lived thread, and
        # the ranks must outlive it (PR_SET_PDEATHSIG follows the thread that spawned them)
        box: list = []
        caller = threading.Thread(target=lambda: box.append(pool.run(pid_and_rank, deadline_s=60)))
        caller.start()
        caller.join()
        first = box[0]
        assert first.ok, first.report()
        pids = [pid for pid, _ in first.results]
        assert pids == pool.pids and pool.alive
        run_ids.append(pool.run_id)

        hang = pool.run(rank1_hangs, deadline_s=5)
        assert hang.status == "deadlock", hang.report()
        assert hang.run_id == run_ids[0]  # same launch as job 1
        assert "rank1_hangs" in (hang.outcomes[1].stack or "") and "barrier" in (hang.outcomes[0].stack or "")
        report = hang.report()
        assert "--- rank 0" in report and "--- rank 1" in report
        assert not pool.alive and processes_with_env(RUN_ID_ENV, run_ids[0]) == []

        third = pool.run(pid_and_rank, deadline_s=60)
        assert third.ok, third.report()
        assert [pid for pid, _ in third.results] != pids and pool.launches == 2
        run_ids.append(pool.run_id)

        crash = pool.run(rank1_raises, deadline_s=30)
        assert crash.status == "crash" and crash.failed_rank == 1, crash.report()
        assert "seeded failure in job 4" in (crash.outcomes[1].exception or "")
        # the peer: its stack if still waiting, or its own error if gloo saw the connection close
        assert crash.outcomes[0].stack or crash.outcomes[0].exception, crash.report()
        assert processes_with_env(RUN_ID_ENV, run_ids[1]) == []
    finally:
        pool.close()
    for run_id in run_ids:
        assert processes_with_env(RUN_ID_ENV, run_id) == []
