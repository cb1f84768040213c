"""Rank functions for the partition tests (importable by the rank processes)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch.distributed as dist

from moeconf.partition import rank_job


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
