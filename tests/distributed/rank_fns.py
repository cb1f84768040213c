"""Small rank functions exercised by test_launcher (run inside rank processes).

Function names of hanging frames are asserted on in the tests; keep them
distinctive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any


def _rank() -> int:
    return int(os.environ["RANK"])


def allreduce_ok(value: float) -> dict[str, Any]:
    """Every rank contributes ``value * (rank + 1)``; returns the reduced sum."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([value * (_rank() + 1)])
    dist.all_reduce(t)
    return {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "sum": float(t.item()),
        "local_rank": int(os.environ["LOCAL_RANK"]),
    }


def _never_joins_collective() -> None:
    time.sleep(10_000)


def _stuck_in_all_reduce() -> None:
    import torch
    import torch.distributed as dist

    dist.all_reduce(torch.ones(4))


def deadlock_fn() -> None:
    """Rank 0 sleeps forever, so the others wait in all_reduce forever."""
    if _rank() == 0:
        _never_joins_collective()
    else:
        _stuck_in_all_reduce()


class RankFailure(RuntimeError):
    pass


def _explode(rank: int) -> None:
    raise RankFailure(f"boom from rank {rank}")


def raise_on_rank1() -> str:
    """Rank 1 raises; rank 0 then blocks in a collective its peer never joins."""
    if _rank() == 1:
        _explode(1)
    _stuck_in_all_reduce()
    return "unreachable"


def sigkill_on_rank1() -> None:
    """Rank 1 SIGKILLs itself mid-step while rank 0 waits in all_reduce."""
    import torch
    import torch.distributed as dist

    dist.all_reduce(torch.ones(1))  # one successful step first
    if _rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    _stuck_in_all_reduce()


def _hang_after_spawning_grandchild() -> None:
    time.sleep(10_000)


def grandchild_then_hang(pid_file: str) -> None:
    """Each rank spawns ``sleep 1000`` (a grandchild of the launcher), records
    its pid, then hangs."""
    child = subprocess.Popen(["sleep", "1000"])
    with open(f"{pid_file}.{_rank()}", "w") as fh:
        fh.write(str(child.pid))
    _hang_after_spawning_grandchild()


def return_env(*names: str) -> dict[str, str | None]:
    """Echo selected environment variables (checks env plumbing)."""
    return {n: os.environ.get(n) for n in names}
