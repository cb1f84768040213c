"""Multi-rank backends: the registry block under DeepSpeed ZeRO-2/3 or torch FSDP2, on N local ranks.

- ``zero3-leaf``: ZeRO-3 with the block class registered via ``deepspeed.utils.set_z3_leaf_modules``.
- ``zero2-dense`` / ``fsdp2-dense``: ZeRO-2 / FSDP2 with the dense patched block.
- Negative controls: ``zero3`` (no leaf), ``zero2`` / ``fsdp2`` (stock block).

Every case runs with the same batch replicated on all ranks (so the averaged gradients equal the
single-process ones and the standard parity checks apply); ``run_session`` also runs the adversarial
multi-step case (``moeconf.partition.steps``). A hang is reported as ``DeadlockError`` with every
rank's Python stack, a dead rank as ``RankCrashError``; no process outlives the call.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from moeconf.backends.base import BackendError, Observation, RunRequest
from moeconf.devices import device_available
from moeconf.distributed import MultiRankResult, run_ranks
from moeconf.partition.dense import dense_reason
from moeconf.partition.rank_job import CaseInput, RankJob, StepsInput, Strategy
from moeconf.partition.steps import StepsObservation, StepsRequest
from moeconf.registry.entry import ArchEntry

DEFAULT_DEADLINE_S = float(os.environ.get("MOECONF_DEADLINE_S", "120"))


class PartitionError(BackendError):
    """A multi-rank run that did not finish cleanly; ``result`` holds every rank's outcome and stack."""

    status = "fail"  # a hang or a dead rank is a failed check, not a harness error

    def __init__(self, message: str, result: MultiRankResult) -> None:
        super().__init__(message)
        self.result = result


class DeadlockError(PartitionError):
    """The ranks did not finish before the deadline."""


class RankCrashError(PartitionError):
    """A rank died (exit status or signal) or raised."""


@dataclass
class PartitionedBackend:
    """A block sharded over ``world_size`` local ranks (gloo on CPU)."""

    name: str
    strategy: Strategy
    leaf: bool = False
    dense: bool = False
    world_size: int = 2
    deadline_s: float = DEFAULT_DEADLINE_S
    devices: tuple[str, ...] = ("cpu",)
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    rank_fn: str = "moeconf.partition.rank_job:run_job"

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
        entry = requests[0].entry if requests else steps.entry  # type: ignore[union-attr]
        dtype = requests[0].dtype if requests else steps.dtype  # type: ignore[union-attr]
        job = RankJob(
            entry=entry,
            strategy=self.strategy,
            leaf=self.leaf,
            dense=self.dense,
            dtype=dtype,
            cases=tuple(CaseInput(r.params, r.hidden, r.attention_mask, r.grad_output) for r in requests),
            steps=None if steps is None else StepsInput(steps.params, steps.batches, steps.grad_outputs, steps.lr),
        )
        env = {"DS_ACCELERATOR": "cpu", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
        result = run_ranks(self.rank_fn, (job,), world_size=self.world_size, deadline_s=self.deadline_s, env=env)
        if result.status == "deadlock":
            raise DeadlockError(
                f"deadlock: ranks still running after {self.deadline_s:.0f} s\n{result.report()}", result
            )
        if result.status != "ok":
            raise RankCrashError(f"{result.status}: {result.message}\n{result.report()}", result)
        per_rank = result.results
        observations = [_observation(requests[i], per_rank[0]["cases"][i]) for i in range(len(requests))]
        steps_obs = None
        if steps is not None:
            ranks = [r["steps"] for r in per_rank]
            steps_obs = StepsObservation(
                outputs=[[ranks[r]["outputs"][s] for r in range(self.world_size)] for s in range(len(steps.batches))],
                grads=ranks[0]["grads"],
                missing_grads=ranks[0]["missing_grads"],
                params_after=ranks[0]["params_after"],
            )
        return observations, steps_obs


def _observation(request: RunRequest, seen: dict) -> Observation:
    spec = request.entry.spec
    logits = seen["router_logits"]
    aux = None
    if spec.losses.aux == "switch" and logits is not None:
        from moeconf.backends.hf_block import framework_loss_fn

        aux = framework_loss_fn(request.entry, "load_balancing_loss_func")(
            (logits,), spec.num_experts, spec.top_k, request.attention_mask
        )
    return Observation(
        output=seen["output"],
        topk_index=seen["topk_index"],
        topk_weights=seen["topk_weights"],
        router_logits=logits,
        aux_loss=None if aux is None else torch.as_tensor(aux).detach(),
        grads=seen["grads"],
        missing_grads=tuple(seen["missing_grads"]),
    )


ZERO3_LEAF = PartitionedBackend("zero3-leaf", "zero3", leaf=True)
ZERO3 = PartitionedBackend("zero3", "zero3")
ZERO2_DENSE = PartitionedBackend("zero2-dense", "zero2", dense=True)
ZERO2 = PartitionedBackend("zero2", "zero2")
FSDP2_DENSE = PartitionedBackend("fsdp2-dense", "fsdp2", dense=True)
FSDP2 = PartitionedBackend("fsdp2", "fsdp2")
PARTITIONED = (ZERO3_LEAF, ZERO3, ZERO2_DENSE, ZERO2, FSDP2_DENSE, FSDP2)
