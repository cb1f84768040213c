"""A multi-rank backend on a process group that is already there (torchrun, deepspeed, srun).

``InGroupBackend`` wraps one of moeconf's multi-rank backends — a ``PartitionedBackend``
(``zero3-leaf``, ``zero2-dense``, ``fsdp2-dense`` and their negative controls) or an
``EPAllToAllBackend`` (``ep-alltoall``, ``ep-alltoall-4`` and their negative controls) — and keeps its
name, devices, dtypes and ``supports()``, so the engine produces the same records under the same
names. Where the local backend starts ``world_size`` processes and runs its rank function
(``rank_job.run_job``, ``ep_rank.run_ep_job``) in each, this one runs that function *in this
process*, on the job's group (all its ranks: ``world_refusal`` says when a backend's name fixes
another), and exchanges the ranks' results with ``all_gather_object``. Every rank runs the same
engine on the same seeds, so every rank builds the same requests, gets the same gathered
observations and judges them into the same records; rank 0 writes the report.

A rank that raises does not leave the others waiting: each rank's outcome (its result or its
traceback) goes through the same all-gather, and every rank raises the same ``RankFailure``. A rank
stuck in a collective is ended by the group's timeout (``init_from_env``): its ``RuntimeError``
becomes a ``hang`` record on the ranks that saw it.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar, cast

from moeconf.backends.base import (
    EnvironmentFault,
    FailureKind,
    Observation,
    RankFailure,
    RunRequest,
    StepsObservation,
    StepsRequest,
    steps_observation,
)
from moeconf.backends.ep_alltoall import DEFAULT_WORLD_SIZE, EPAllToAllBackend, ep_observations
from moeconf.backends.ep_rank import run_ep_job
from moeconf.backends.partitioned import HEADLINE_MAX, PartitionedBackend, preflight
from moeconf.backends.rank_job import RankResult, run_job
from moeconf.registry.entry import ArchEntry

LocalBackend = PartitionedBackend | EPAllToAllBackend
"""The backends with an in-group form: those whose rank function runs on any initialised group."""
R = TypeVar("R")


def _clip(line: str) -> str:
    return line if len(line) <= HEADLINE_MAX else line[: HEADLINE_MAX - 3] + "..."


def machine_check(name: str, local: LocalBackend) -> None:
    """The local backend's own ``preflight`` (``EnvironmentFault``), run before the group forms."""
    if isinstance(local, PartitionedBackend):
        preflight(name, local.uses_deepspeed, local.lock_wait_s)
    else:
        preflight(name, False)  # as EPAllToAllBackend.launch: no DeepSpeed


def world_refusal(name: str, local: LocalBackend, world: int) -> str | None:
    """Why ``local`` cannot run on a job of ``world`` ranks (one line), else None.

    The partitioned backends and ``ep-alltoall`` (and its controls) run on the job's world: their 2
    local ranks are a default, not what they check. An expert-parallel backend built for another
    world size (``ep-alltoall-4``) runs on that many ranks only: on another world its records would
    name a layout (experts per rank, empty owners) that did not run."""
    if not isinstance(local, EPAllToAllBackend) or local.world_size in (DEFAULT_WORLD_SIZE, world):
        return None
    return (
        f"{name} runs on {local.world_size} ranks and this job has {world}: launch {local.world_size} "
        "ranks, or use ep-alltoall (it runs on the job's ranks)"
    )


@dataclass
class _Failed:
    """A rank's exception, as text (exceptions of backends need not pickle)."""

    rank: int
    line: str
    trace: str


@dataclass
class InGroupBackend:
    """``local``'s rank function on the current ``torch.distributed`` group; a ``MultiRankBackend``."""

    local: LocalBackend
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
    def steps_world_size(self) -> int | None:
        """The partitioned backends' adversarial steps give every rank of the job its own batch. The
        expert-parallel rank cuts all replicas' tokens over its ranks whatever their number, so it
        keeps the local backend's replicas (None: ``make_steps``' default), hence its steps."""
        import torch.distributed as dist

        return dist.get_world_size() if isinstance(self.local, PartitionedBackend) else None

    @property
    def router_losses_in_steps(self) -> bool:
        """The engine's capability flag, the local backend's: the same rank job weighs the same losses."""
        return bool(getattr(self.local, "router_losses_in_steps", False))

    def supports(self, entry: ArchEntry, dtype: str, device: str) -> str | None:
        return self.local.supports(entry, dtype, device)

    def run(self, request: RunRequest) -> Observation:
        observations, _ = self.run_session([request], None)
        return observations[0]

    def run_session(
        self, requests: list[RunRequest], steps: StepsRequest | None
    ) -> tuple[list[Observation], StepsObservation | None]:
        if not requests and steps is None:
            return [], None
        if self.setup_fault is not None:
            raise EnvironmentFault(self.setup_fault)
        if self.broken is not None:
            raise RankFailure("hang", _clip(f"not run: {self.broken}"), "")
        if isinstance(self.local, EPAllToAllBackend):
            ep_job = self.local.job(requests, steps)
            return ep_observations(self._exchange(lambda: run_ep_job(ep_job)), steps)
        job = self.local.job(requests, steps)
        return _partitioned_observations(self._exchange(lambda: run_job(job)), steps)

    def _exchange(self, run: Callable[[], R]) -> list[R]:
        """Every rank's result of ``run()`` in rank order; ``RankFailure`` on every rank when any rank
        raised (``hang`` when one timed out, else ``crash``) or the exchange itself failed (``hang``
        on this rank). After a timeout the group is marked broken."""
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        mine: R | _Failed
        try:
            mine = run()
        except Exception as exc:  # noqa: BLE001 - the code under test raised: every rank must hear of it
            mine = _Failed(rank, _first_line(exc), traceback.format_exc())
        gathered: list[R | _Failed | None] = [None] * world
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
            timed_out = any(_timed_out(f.line) for f in failed)
            if timed_out:
                self.broken = "a collective of an earlier launch timed out"
            kind: FailureKind = "hang" if timed_out else "crash"
            head = f"{kind}: rank {failed[0].rank} raised {failed[0].line}"
            detail = "\n".join(f"--- rank {f.rank} ---\n{f.trace.rstrip()}" for f in failed)
            raise RankFailure(kind, _clip(head), detail)
        return cast(list[R], gathered)  # every rank answered and none failed


def _partitioned_observations(
    per_rank: list[RankResult], steps: StepsRequest | None
) -> tuple[list[Observation], StepsObservation | None]:
    """The local backend's assembly (``steps_observation``): cases as rank 0 saw them; every rank's
    step outputs ``[step][rank]``; grads and params (gathered, identical on every rank) as rank 0 saw them."""
    steps_obs = None if steps is None else steps_observation([r.steps or [] for r in per_rank])
    return per_rank[0].cases, steps_obs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _timed_out(line: str) -> bool:
    """gloo says "Timed out waiting ...", NCCL's watchdog "Watchdog caught collective operation timeout"."""
    low = line.lower()
    return "timed out" in low or "timeout" in low
