"""``ep-alltoall``: expert parallelism as Megatron-LM and DeepSpeed-MoE lay it out, on N local CPU ranks.

Each rank owns a contiguous range of the E experts (``ep_rank.expert_split``: ``E // W`` each, the
first ``E % W`` ranks one more) and a contiguous slice of the case's tokens; it routes its tokens
with the block's own router, exchanges per-expert counts with ``all_to_all_single``, dispatches the
rows to the experts' owners with ``all_to_all_single``, runs its experts (SwiGLU on the entry's own
fused weights), returns the results with the reverse all-to-all and combines them with the routing
weights. Rank 0 gathers the whole batch's output, routing and gradients (each expert's from its
owner), which the standard checks compare with the float64 reference. See docs/expert-parallel.md.

Backends: ``ep-alltoall`` (2 ranks), ``ep-alltoall-4`` (4 ranks); negative controls (seeded bugs
the gate must catch): ``ep-alltoall-wrong-splits``, ``ep-alltoall-no-count-exchange``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from moeconf.backends.base import (
    Observation,
    RunRequest,
    StepsObservation,
    StepsRequest,
)
from moeconf.backends.ep_rank import Bug, EPJob, EPResult
from moeconf.backends.fused_experts import standard_layout_reason
from moeconf.backends.partitioned import launch, launch_deadline, preflight, token_types_reason
from moeconf.devices import device_available
from moeconf.hf.block import build_block
from moeconf.registry.entry import ArchEntry


def ep_reason(entry: ArchEntry) -> str | None:
    """None when ``ep-alltoall`` can run ``entry``, else why not (one line)."""
    token_types = token_types_reason(entry)
    if token_types is not None:
        return token_types
    layout = standard_layout_reason(entry)
    if layout is not None:
        return f"expert parallelism re-implements the experts for the fused SwiGLU layout only: {layout}"
    if entry.spec.router.capacity is not None:
        return "capacity drops are not implemented in the expert-parallel dispatch (no capacity in all_to_all)"
    return _fused_parameters_reason(entry)


@cache
def _fused_parameters_reason(entry: ArchEntry) -> str | None:
    """Each rank slices the experts' 3-D ``gate_up_proj``/``down_proj`` *parameters*; an entry whose
    bindings read that layout from per-expert modules (transformers 4.x ModuleLists) has none to
    slice. Looked up on the installed block, built on the meta device (no memory)."""
    with torch.device("meta"):
        experts = build_block(entry).get_submodule(entry.experts_path)
    names = ("gate_up_proj", "down_proj")
    if all(isinstance(getattr(experts, n, None), nn.Parameter) for n in names):
        return None
    return f"the installed experts module ({type(experts).__name__}) holds no fused 3-D gate_up_proj/down_proj parameters (per-expert modules)"


DEFAULT_WORLD_SIZE = 2
"""The local ranks of a backend that names no world size (``ep-alltoall`` and its controls); under an
outside launcher those run on the job's world, one that names another (``ep-alltoall-4``) on that only."""


@dataclass
class EPAllToAllBackend:
    """Expert-parallel block on ``world_size`` local ranks (gloo); a ``MultiRankBackend``."""

    name: str
    world_size: int = DEFAULT_WORLD_SIZE
    bug: Bug | None = None
    """A seeded dispatch bug (negative controls); None for the real backend."""
    deadline_s: float | None = None
    """Seconds before the launch counts as hung; None: ``MOECONF_DEADLINE_S`` (default 120)."""
    devices: tuple[str, ...] = ("cpu",)
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    rank_fn: str = "moeconf.backends.ep_rank:run_ep_job"
    reuse_ranks: bool = True
    """Sessions run on this backend's rank pool (see ``PartitionedBackend.reuse_ranks``)."""

    @property
    def negative_control(self) -> bool:
        """A configuration known to be wrong: the suite expects it to be caught."""
        return self.bug is not None

    def supports(self, entry: ArchEntry, dtype: str, device: str) -> str | None:
        if device not in self.devices or not device_available(device):
            return f"{self.name} runs on {', '.join(self.devices)} only"
        return ep_reason(entry)

    def run(self, request: RunRequest) -> Observation:
        observations, _ = self.run_session([request], None)
        return observations[0]

    def deadline(self) -> float:
        return launch_deadline(self.deadline_s)

    def job(self, requests: list[RunRequest], steps: StepsRequest | None) -> EPJob:
        """What every rank runs for one session; also the in-group form's (``moeconf.partition``),
        so both launch the same job."""
        first = requests[0] if requests else steps
        assert first is not None
        return EPJob(entry=first.entry, dtype=first.dtype, cases=tuple(requests), steps=steps, bug=self.bug)

    def launch(self, requests: list[RunRequest], steps: StepsRequest | None) -> list[EPResult]:
        """Every rank's result (``RankFailure`` on a hang or a dead rank, ``EnvironmentFault`` when the
        machine is at fault)."""
        job = self.job(requests, steps)
        deadline_s = self.deadline()
        preflight(self.name, False)
        env = {"TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
        return launch(self.name, self.rank_fn, job, self.world_size, deadline_s, env, self.reuse_ranks)

    def run_session(
        self, requests: list[RunRequest], steps: StepsRequest | None
    ) -> tuple[list[Observation], StepsObservation | None]:
        """All cases (and the adversarial steps) of one architecture in one launch."""
        if not requests and steps is None:
            return [], None
        return ep_observations(self.launch(requests, steps), steps)


def ep_observations(
    per_rank: list[EPResult], steps: StepsRequest | None
) -> tuple[list[Observation], StepsObservation | None]:
    """A session's ``(observations, steps observation)`` from every rank's result, in rank order.

    Rank 0's alone: it gathered the whole batch (outputs ``[B, S, H]``, routing, every owner's
    expert grads) and every replica's step outputs ``[step][replica]``. Shared by the local launcher
    and the in-group form (``moeconf.partition``), so both assemble the same observation."""
    lead = per_rank[0]
    steps_obs = None
    if steps is not None:
        assert lead.steps is not None and lead.steps_outputs is not None
        steps_obs = StepsObservation(
            outputs=lead.steps_outputs,
            grads=[s.grads for s in lead.steps],
            missing_grads=[s.missing_grads for s in lead.steps],
            params_after=[s.params_after for s in lead.steps],
        )
    return lead.cases, steps_obs


EP_ALLTOALL = EPAllToAllBackend("ep-alltoall")
EP_ALLTOALL_4 = EPAllToAllBackend("ep-alltoall-4", world_size=4)
EP_WRONG_SPLITS = EPAllToAllBackend("ep-alltoall-wrong-splits", bug="wrong-splits")
EP_NO_COUNT_EXCHANGE = EPAllToAllBackend("ep-alltoall-no-count-exchange", bug="no-count-exchange")
EP_BACKENDS = (EP_ALLTOALL, EP_ALLTOALL_4, EP_WRONG_SPLITS, EP_NO_COUNT_EXCHANGE)
