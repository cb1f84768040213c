"""The partition harness's own tests: a rank killed mid-step is reported fast, and each partition
check goes red on a seeded rank-job bug (FSDP2, no DeepSpeed needed for the latter)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from moeconf.backends.rank_job import RankJob
from moeconf.distributed import processes_with_env, run_ranks
from moeconf.distributed.launcher import RUN_ID_ENV
from moeconf.harness.engine import Selection, run_selection
from moeconf.harness.partition_checks import STEPS_CASE
from moeconf.harness.steps import make_steps
from moeconf.registry import REGISTRY

pytestmark = pytest.mark.partition


def test_rank_killed_mid_step_is_reported_within_10_s(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    entry = REGISTRY["mixtral"]
    steps, _ = make_steps(entry, torch.float32, "cpu")
    job = RankJob(entry, "zero2", False, True, torch.float32, (), steps)
    marker = tmp_path / "killed_at"
    result = run_ranks(
        "tests.partition.rank_fns:run_job_then_die",
        (job, str(marker)),
        world_size=2,
        deadline_s=120,
        env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
    )
    detected = time.time()
    assert result.status == "crash" and result.failed_rank == 1
    assert result.outcomes[1].signal == signal.SIGKILL.name or "SIGKILL" in result.report()
    assert detected - float(marker.read_text()) < 10
    assert processes_with_env(RUN_ID_ENV, result.run_id) == []


@pytest.mark.parametrize(
    "bug",
    ["lr_doubled", "dirty_idle_grads", "output_scaled", "aux_scaled_by_world_size", "aux_detached", "stale_aux"],
)
def test_seeded_partition_bug_turns_its_check_red(bug: str) -> None:
    """Each partition check can fail: a rank job with one seeded bug."""
    from tests.partition.seeded_partition import SEEDED_PARTITION

    must_fail, must_pass = SEEDED_PARTITION[bug]
    sel = Selection(archs=("mixtral",), backends=(f"tests.partition.seeded_partition:{bug}",), cases=(STEPS_CASE,))
    records = {r.check: r for group in run_selection(sel) for r in group}
    red = {c for c, r in records.items() if r.status == "fail"}
    assert must_fail <= red, f"{bug}: red {red}"
    assert not (must_pass & red), f"{bug}: also red {must_pass & red}"
