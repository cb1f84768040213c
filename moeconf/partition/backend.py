"""A multi-rank backend on a process group that is already there (torchrun, deepspeed, srun).

``InGroupBackend`` wraps one of moeconf's ``PartitionedBackend`` s (``zero3-leaf``, ``zero2-dense``,
``fsdp2-dense`` and their negative controls) and keeps its name, devices, dtypes and ``supports()``,
so the engine produces the same records under the same names. Where the local backend starts
``world_size`` processes and runs ``rank_job.run_job`` in each, this one runs ``run_job`` *in this
process*, on the job's group, and exchanges the ranks' results with ``all_gather_object``. Every rank
runs the same engine on the same seeds, so every rank builds the same requests, gets the same
gathered observations and judges them into the same records; rank 0 writes the report.

A rank that raises does not leave the others waiting: each rank's outcome (its result or its
traceback) goes through the same all-gather, and every rank raises the same ``RankFailure``. A rank
stuck in a collective is ended by the group's timeout (``init_from_env``): its ``RuntimeError``
becomes a ``hang`` record on the ranks that saw it.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

from moeconf.backends.base import (
    EnvironmentFault,
    FailureKind,
    Observation,
    RankFailure,
    RunRequest,
    StepsObservation,
    StepsRequest,
)
from moeconf.backends.partitioned import HEADLINE_MAX, PartitionedBackend
from moeconf.backends.rank_job import RankJob, RankResult, run_job
from moeconf.registry.entry import ArchEntry


def _clip(line: str) -> str:
    return line if len(line) <= HEADLINE_MAX else line[: HEADLINE_MAX - 3] + "..."


@dataclass
class _Failed:
    """A rank's exception, as text (exceptions of backends need not pickle)."""

    rank: int
    line: str
    trace: str


@dataclass
class InGroupBackend:
    """``local``'s rank job on the current ``torch.distributed`` group; a ``MultiRankBackend``."""

    local: PartitionedBackend
    setup_fault: str | None = None
    """A machine fault that some rank found before the group formed (``preflight``): every session is
    ``setup`` on every rank."""
    broken: str | None = field(default=None, init=False)
    """Set after a collective timed out: the group can no longer be trusted for later sessions."""

    @property
    def name(self) -> str:
        return self.local.name

    @property
    def devices(self) -> tuple[str, ...]:
        return self.local.devices

    @property
    def dtypes(self) -> tuple[str, ...]:
        return self.local.dtypes

    @property
    def negative_control(self) -> bool:
        return self.local.negative_control

    @property
    def steps_world_size(self) -> int:
        """The adversarial steps give every rank of the job its own batch."""
        import torch.distributed as dist

        return dist.get_world_size()

    def supports(self, entry: ArchEntry, dtype: str, device: str) -> str | None:
        return self.local.supports(entry, dtype, device)

    def run(self, request: RunRequest) -> Observation:
        observations, _ = self.run_session([request], None)
        return observations[0]

    def run_session(
        self, requests: list[RunRequest], steps: StepsRequest | None
    ) -> tuple[list[Observation], StepsObservation | None]:
        import torch.distributed as dist

        first = requests[0] if requests else steps
        if first is None:
            return [], None
        if self.setup_fault is not None:
            raise EnvironmentFault(self.setup_fault)
        if self.broken is not None:
            raise RankFailure("hang", _clip(f"not run: {self.broken}"), "")
        job = RankJob(
            entry=first.entry,
            strategy=self.local.strategy,
            leaf=self.local.leaf,
            dense=self.local.dense,
            dtype=first.dtype,
            cases=tuple(requests),
            steps=steps,
        )
        rank, world = dist.get_rank(), dist.get_world_size()
        mine: RankResult | _Failed
        try:
            mine = run_job(job)
        except Exception as exc:  # noqa: BLE001 - the code under test raised: every rank must hear of it
            mine = _Failed(
                rank,
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                traceback.format_exc(),
            )
        gathered: list[RankResult | _Failed | None] = [None] * world
        try:
            dist.all_gather_object(gathered, mine)
        except Exception as exc:  # noqa: BLE001 - the group timed out or a peer is gone
            self.broken = f"the process group failed in an earlier launch ({type(exc).__name__})"
            local = f"; this rank had raised {mine.line}" if isinstance(mine, _Failed) else ""
            raise RankFailure(
                "hang",
                _clip(f"hang: rank {rank} could not exchange results with the other ranks ({exc}){local}"),
                mine.trace if isinstance(mine, _Failed) else "",
            ) from None
        failed = [g for g in gathered if isinstance(g, _Failed)]
        if failed:
            if any(_timed_out(f.line) for f in failed):
                self.broken = "a collective of an earlier launch timed out"
            kind: FailureKind = "hang" if any(_timed_out(f.line) for f in failed) else "crash"
            head = f"{kind}: rank {failed[0].rank} raised {failed[0].line}"
            detail = "\n".join(f"--- rank {f.rank} ---\n{f.trace.rstrip()}" for f in failed)
            raise RankFailure(kind, _clip(head), detail)
        per_rank = [g for g in gathered if isinstance(g, RankResult)]
        steps_obs = None
        if steps is not None:
            # NOTE: the same assembly as the local backend: outputs of every rank, grads and params
            # (gathered, identical on every rank) as rank 0 saw them.
            ranks = [r.steps or [] for r in per_rank]
            lead = ranks[0]
            steps_obs = StepsObservation(
                outputs=[[ranks[r][s].output for r in range(world)] for s in range(len(steps.batches))],
                grads=[s.grads for s in lead],
                missing_grads=[s.missing_grads for s in lead],
                params_after=[s.params_after for s in lead],
            )
        return per_rank[0].cases, steps_obs


def _timed_out(line: str) -> bool:
    """gloo says "Timed out waiting ...", NCCL's watchdog "Watchdog caught collective operation timeout"."""
    low = line.lower()
    return "timed out" in low or "timeout" in low
