"""Multi-rank backends: the registry block under DeepSpeed ZeRO-2/3 or torch FSDP2, on N local ranks.

- ``zero3-leaf``: ZeRO-3 with the block class registered via ``deepspeed.utils.set_z3_leaf_modules``.
- ``zero2-dense`` / ``fsdp2-dense``: ZeRO-2 / FSDP2 with the dense patched block.
- Negative controls: ``zero3`` (no leaf), ``zero2`` / ``fsdp2`` (stock block).

Every case runs with the same batch replicated on all ranks (so the averaged gradients equal the
single-process ones and the standard parity checks apply); ``run_session`` also runs the adversarial
multi-step case (``moeconf.harness.steps``). A hang or a dead rank is raised as ``RankFailure``
(one-line summary + every rank's Python stack); no process outlives the call.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from moeconf.backends.base import (
    BackendError,
    Observation,
    RankFailure,
    RunRequest,
    StepsObservation,
    StepsRequest,
)
from moeconf.backends.dense import dense_reason
from moeconf.backends.rank_job import RankJob, RankResult, Strategy
from moeconf.devices import device_available
from moeconf.distributed import MultiRankResult, run_ranks
from moeconf.registry.entry import ArchEntry

DEFAULT_DEADLINE_S = float(os.environ.get("MOECONF_DEADLINE_S", "120"))


def headline(result: MultiRankResult) -> str:
    """One line: what happened, to which rank, with which signal or exception."""
    if result.status == "deadlock":
        running = [o.rank for o in result.outcomes if o.killed_by_launcher]
        return f"hang: ranks {running} still running after {result.deadline_s:g} s (every rank's stack on no_hang)"
    failed = next((o for o in result.outcomes if o.rank == result.failed_rank), None)
    if failed is None:
        return f"{result.status}: {result.message.splitlines()[0] if result.message else 'no rank result'}"
    if failed.exception:
        last = failed.exception.strip().splitlines()[-1]
        return f"crash: rank {failed.rank} raised {last}"
    return f"crash: rank {failed.rank} {failed.describe_exit()}"


@dataclass
class PartitionedBackend:
    """A block sharded over ``world_size`` local ranks (gloo on CPU); a ``MultiRankBackend``."""

    name: str
    strategy: Strategy
    leaf: bool = False
    dense: bool = False
    world_size: int = 2
    deadline_s: float = DEFAULT_DEADLINE_S
    devices: tuple[str, ...] = ("cpu",)
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    rank_fn: str = "moeconf.backends.rank_job:run_job"
    negative_control: bool = False
    """A configuration known to be wrong (no leaf, stock block): the suite expects it to be caught."""

    def supports(self, entry: ArchEntry, dtype: str, device: str) -> str | None:
        if device not in self.devices or not device_available(device):
            return f"{self.name} runs on {', '.join(self.devices)} only"
        if self.strategy != "fsdp2" and importlib.util.find_spec("deepspeed") is None:
            return "deepspeed is not installed (pip install 'moeconf[deepspeed]')"
        if self.dense:
            return dense_reason(entry)
        return None

    def run(self, request: RunRequest) -> Observation:
        observations, _ = self.run_session([request], None)
        return observations[0]

    def run_session(
        self, requests: list[RunRequest], steps: StepsRequest | None
    ) -> tuple[list[Observation], StepsObservation | None]:
        """All cases (and the adversarial steps) of one architecture in one multi-rank launch."""
        first = requests[0] if requests else steps
        if first is None:
            return [], None
        job = RankJob(
            entry=first.entry,
            strategy=self.strategy,
            leaf=self.leaf,
            dense=self.dense,
            dtype=first.dtype,
            cases=tuple(requests),
            steps=steps,
        )
        env = {"DS_ACCELERATOR": "cpu", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
        result = run_ranks(self.rank_fn, (job,), world_size=self.world_size, deadline_s=self.deadline_s, env=env)
        if result.status == "deadlock":
            raise RankFailure("hang", headline(result), result.report(), result.run_id)
        if result.status == "crash":
            raise RankFailure("crash", headline(result), result.report(), result.run_id)
        if result.status != "ok":
            raise BackendError(f"the launcher failed: {result.message}")
        per_rank: list[RankResult] = result.results
        steps_obs = None
        if steps is not None:
            ranks = [r.steps or [] for r in per_rank]
            lead = ranks[0]
            steps_obs = StepsObservation(
                outputs=[[ranks[r][s].output for r in range(self.world_size)] for s in range(len(steps.batches))],
                grads=[s.grads for s in lead],
                missing_grads=[s.missing_grads for s in lead],
                params_after=[s.params_after for s in lead],
            )
        return per_rank[0].cases, steps_obs


ZERO3_LEAF = PartitionedBackend("zero3-leaf", "zero3", leaf=True)
ZERO3 = PartitionedBackend("zero3", "zero3", negative_control=True)
ZERO2_DENSE = PartitionedBackend("zero2-dense", "zero2", dense=True)
ZERO2 = PartitionedBackend("zero2", "zero2", negative_control=True)
FSDP2_DENSE = PartitionedBackend("fsdp2-dense", "fsdp2", dense=True)
FSDP2 = PartitionedBackend("fsdp2", "fsdp2", negative_control=True)
PARTITIONED = (ZERO3_LEAF, ZERO3, ZERO2_DENSE, ZERO2, FSDP2_DENSE, FSDP2)
