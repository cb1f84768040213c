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


def _with_step_loss(job: rank_job.RankJob, wrong: Any) -> Any:
    """The real rank job with ``rank_job.step_loss`` replaced by ``wrong(steps, loss, losses)``."""
    rank_job.step_loss = wrong
    return rank_job.run_job(job)


def run_job_aux_scaled_by_world_size(job: rank_job.RankJob) -> Any:
    """Seeded bug: the aux term is multiplied by the world size, as a trainer that rescales the whole
    loss for a token-count normalisation across ranks does to the aux loss too (the effective aux
    coefficient then grows with the number of ranks)."""
    original = rank_job.step_loss

    def wrong(steps: Any, loss: Any, losses: Any) -> Any:
        scaled = {k: (v * dist.get_world_size() if k == "aux_loss" and v is not None else v) for k, v in losses.items()}
        total, _ = original(steps, loss, scaled)
        _, seen = original(steps, loss, losses)
        return total, seen

    return _with_step_loss(job, wrong)


def run_job_aux_detached(job: rank_job.RankJob) -> Any:
    """Seeded bug: the aux loss is added with its value right but detached (it never trains the router)."""
    original = rank_job.step_loss

    def wrong(steps: Any, loss: Any, losses: Any) -> Any:
        return original(steps, loss, {k: (v.detach() if v is not None else v) for k, v in losses.items()})

    return _with_step_loss(job, wrong)


def run_job_stale_aux(job: rank_job.RankJob) -> Any:
    """Seeded bug: a running mean of the aux loss that is not reset between micro-batches: every
    micro-batch after a step's first weighs the mean of its own aux loss and the previous one's."""
    original = rank_job.step_loss
    state: dict[str, Any] = {"count": 0, "previous": None}

    def wrong(steps: Any, loss: Any, losses: Any) -> Any:
        aux = losses.get("aux_loss")
        first_micro = state["count"] % steps.accumulation == 0
        state["count"] += 1
        if aux is not None and not first_micro and state["previous"] is not None:
            losses = {**losses, "aux_loss": (aux + state["previous"]) / 2}
        state["previous"] = None if aux is None else aux.detach()
        return original(steps, loss, losses)

    return _with_step_loss(job, wrong)
