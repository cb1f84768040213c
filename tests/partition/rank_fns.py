"""Rank functions for the partition tests (importable by the rank processes)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch.distributed as dist

from moeconf.backends import rank_job


def run_job_then_die(job: rank_job.RankJob, marker: str) -> Any:
    """The real rank job, except that rank 1 SIGKILLs itself in its second forward (mid-step)."""
    original = rank_job._forward_backward
    calls = [0]

    def forward_backward(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if dist.get_rank() == 1 and calls[0] == 2:
            with open(marker, "w") as f:
                f.write(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    rank_job._forward_backward = forward_backward
    return rank_job.run_job(job)


def run_job_lr_doubled(job: rank_job.RankJob) -> Any:
    """Seeded bug: the optimizer steps with twice the learning rate (params after a step go wrong)."""
    import dataclasses

    assert job.steps is not None
    return rank_job.run_job(dataclasses.replace(job, steps=dataclasses.replace(job.steps, lr=2 * job.steps.lr)))


def run_job_dirty_idle_grads(job: rank_job.RankJob) -> Any:
    """Seeded bug: gathered expert gradients carry 1e-30 everywhere (idle experts are not exactly zero)."""
    original = rank_job._gathered

    def gathered(job_: Any, engine: Any, get: Any) -> Any:
        values, missing = original(job_, engine, get)
        if get is engine.full_grad:
            values = {k: (v + 1e-30 if k.startswith("experts.") and v is not None else v) for k, v in values.items()}
        return values, missing

    rank_job._gathered = gathered
    return rank_job.run_job(job)


def run_job_output_scaled(job: rank_job.RankJob) -> Any:
    """Seeded bug: the sharded model's output is off by 1 % (e.g. a wrong reduction)."""
    original = rank_job.Wrapper.forward
    rank_job.Wrapper.forward = lambda self, hidden: original(self, hidden) * 1.01  # type: ignore[method-assign]
    return rank_job.run_job(job)
