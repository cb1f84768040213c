"""Multi-rank execution for partitioning suites (DeepSpeed ZeRO, FSDP2, ...).

:func:`run_ranks` runs an importable rank function on N fresh local
processes with ``torch.distributed`` initialised (gloo by default), and
returns a :class:`MultiRankResult` whose status is ``"ok"``, ``"deadlock"``
(deadline passed; every rank's Python stack attached), ``"crash"`` (a rank
died or raised; its traceback/signal plus the others' stacks attached) or
``"error"`` (the launcher itself failed). No process or temp file outlives
the call.

:mod:`moeconf.distributed.deepspeed_env` prepares DeepSpeed on CPU
(prebuilds its JIT communication op, detects stale build locks).

Importing this package is cheap: it does not import torch or deepspeed.
"""

from moeconf.distributed.launcher import (
    MultiRankResult,
    RankOutcome,
    free_port,
    live_group_members,
    processes_with_env,
    run_ranks,
)

__all__ = [
    "MultiRankResult",
    "RankOutcome",
    "free_port",
    "live_group_members",
    "processes_with_env",
    "run_ranks",
]
