"""Multi-rank backends (``zero3-leaf``, ``zero2-dense``, ``fsdp2-dense``, ...) timed per training step.

Each rank builds the backend's block exactly as the partition suite does (``moeconf.backends.rank_job``:
ZeRO-2/3 with or without the leaf, FSDP2, the dense patch), with seeded parameters at the preset's sizes,
and times whole data-parallel steps: forward on its own ``[1, N, H]`` batch, backward of
``⟨output, G⟩``, the optimizer step (plain SGD) and zeroing the gradients. Ranks start each step
together (a barrier, outside the interval); a step's time is the slowest rank's. So the dense patch's
extra compute (every expert on every token) and the leaf's parameter gathers show up side by side.

The roofline of a step is one rank's share (ranks compute in parallel): that rank's FLOPs and bytes over
the GEMM throughput and bandwidth calibrated on rank 0 with the ranks' thread count; communication is
not part of the limit, so a ratio well below the single-process one is the price of partitioning.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from moeconf.backends.base import EnvironmentFault
from moeconf.backends.partitioned import PartitionedBackend, environment_verdict, headline, preflight
from moeconf.bench.flops import pass_bytes, pass_flops
from moeconf.bench.memory import PeakMemory, host_available_bytes
from moeconf.bench.presets import describe_sizes, weight_count
from moeconf.bench.roofline import Calibration, gemm_throughput, memory_bandwidth, report_calibration
from moeconf.bench.rows import BenchRow
from moeconf.bench.single import random_params
from moeconf.bench.timing import Timing, TimingStatus, budget_cut_message, plan_runs, timed_status
from moeconf.devices import DTYPES
from moeconf.distributed import run_ranks
from moeconf.registry.entry import ArchEntry

if TYPE_CHECKING:
    from moeconf.bench.runner import BenchPlan, Figure, RowFactory, Target

LEARNING_RATE = 1e-6
"""Plain SGD: the update is part of a step; a tiny rate keeps the routing what it was."""
STARTUP_S = 180.0
"""Deadline share of spawning the ranks, importing torch/transformers/DeepSpeed and building the engine."""
CALIBRATION_S = 120.0
GiB = 2**30


@dataclass(frozen=True)
class StepJob:
    """What each rank needs (picklable: the entry is data)."""

    entry: ArchEntry
    strategy: str
    leaf: bool
    dense: bool
    dtype: str
    tokens: tuple[int, ...]
    warmup: int
    repeat: int
    budget_s: float
    seed: int


@dataclass
class StepTiming:
    """Steps of one token count: per-step times (slowest rank), status, what rank 0 saw."""

    tokens: int
    samples_s: list[float]
    status: TimingStatus
    message: str = ""
    experts_touched: int | None = None
    peak_mem_bytes: int | None = None


@dataclass
class RankReport:
    """One rank's return value; rank 0's carries the calibrations (by token count)."""

    rank: int
    threads: int
    timings: list[StepTiming]
    gemm: dict[int, Calibration] = field(default_factory=dict)
    bandwidth: Calibration | None = None


def _max_over_ranks(values: list[float]) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def _randn(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _time_steps(job: StepJob, engine: object, tokens: int, rank: int) -> StepTiming:
    """Probe step (routing recorded), warm-up, then the samples that fit in the budget."""
    import torch.distributed as dist

    from moeconf.hf.block import recording

    spec, dtype = job.entry.spec, DTYPES[job.dtype]
    # NOTE: a ZeRO-3 leaf needs an input that requires grad; each rank gets its own batch (data parallel).
    x = _randn((1, tokens, spec.hidden), dtype, job.seed + 7919 * rank + tokens).requires_grad_(True)
    grad = _randn((1, tokens, spec.hidden), torch.float32, job.seed + 7919 * rank + tokens + 1)

    def step() -> float:
        dist.barrier()
        start = time.perf_counter()
        x.grad = None
        out = engine.model(x)  # type: ignore[attr-defined]
        engine.backward((out.float() * grad).sum())  # type: ignore[attr-defined]
        engine.step()  # type: ignore[attr-defined]
        engine.zero_grad()  # type: ignore[attr-defined]
        return time.perf_counter() - start

    with PeakMemory("cpu") as memory:
        with recording(job.entry, engine.block) as rec:  # type: ignore[attr-defined]
            first = _max_over_ranks([step()])[0]
        index, _ = rec.routing(job.entry)
        touched = None if index is None else int(torch.unique(index.reshape(-1)).numel())
        if first > job.budget_s:
            samples, status = [first], "over_budget"
            message = f"one (cold) step took {first:.3g} s, budget {job.budget_s:g} s; reported: that step"
        else:
            plan = plan_runs(first, job.warmup, job.repeat, job.budget_s, min_sample_s=0.0)
            for _ in range(plan.warmup):
                step()
            samples = _max_over_ranks([step() for _ in range(plan.samples)]) if plan.samples else [first]
            status = timed_status(plan.samples, job.repeat)
            message = budget_cut_message(plan.samples, job.repeat, job.budget_s, first, unit="steps")
    peak = _max_over_ranks([float(memory.peak_bytes or 0)])[0]
    return StepTiming(tokens, samples, status, message, touched, int(peak))  # type: ignore[arg-type]


def time_training_steps(job: StepJob) -> RankReport:
    """The rank function (``run_ranks``): build the engine, time every token count, calibrate on rank 0."""
    import torch.distributed as dist

    # NOTE: the partition suite's own engine builder, so the timed configuration (leaf registration,
    # ZeRO settings, FSDP2 units, dense patch) is the one the parity and partition checks passed.
    from moeconf.backends.rank_job import RankJob, _engine

    rank = dist.get_rank()
    torch.manual_seed(job.seed)
    rank_job = RankJob(job.entry, job.strategy, job.leaf, job.dense, DTYPES[job.dtype], cases=(), steps=None)  # type: ignore[arg-type]
    engine = _engine(rank_job, random_params(job.entry.spec, torch.float32, job.seed), lr=LEARNING_RATE)
    timings = [_time_steps(job, engine, tokens, rank) for tokens in job.tokens]
    report = RankReport(rank, torch.get_num_threads(), timings)
    if rank == 0:  # alone on the machine meanwhile: the other ranks wait at the barrier
        for tokens in job.tokens:
            flops = pass_flops(job.entry.spec, tokens, "fwdbwd", "step")
            report.gemm[tokens] = gemm_throughput("cpu", job.dtype, flops, report.threads)
        report.bandwidth = memory_bandwidth("cpu", job.dtype, report.threads)
    dist.barrier()
    return report


def _memory_shortfall(entry: ArchEntry, dtype: str, world_size: int) -> str | None:
    """Per rank: the fp32 build and fp32 canonical parameters, the cast weights and their gradients."""
    width = torch.empty((), dtype=DTYPES[dtype]).element_size()
    need = world_size * weight_count(entry.spec) * (8 + 3 * width)
    have = host_available_bytes()
    if have is not None and need > have:
        return (
            f"{describe_sizes(entry.spec)} on {world_size} ranks needs ≈ {need / GiB:.1f} GiB, "
            f"{have / GiB:.1f} GiB available (try --scale)"
        )
    return None


def step_rows(
    plan: BenchPlan,
    target: Target,
    backend: PartitionedBackend,
    dtype: str,
    figures: list[Figure],
    new_row: RowFactory,
    note: Callable[[str], None],
) -> list[BenchRow]:
    """One launch of ``backend.world_size`` ranks timing every token count of ``figures``."""
    entry, world = target.entry, backend.world_size
    shortfall = _memory_shortfall(entry, dtype, world)
    if shortfall is not None:
        return [new_row(f, "over_budget", f"not run: {shortfall}") for f in figures]
    try:  # the partition backends' own check of the machine (temp dir, port, DeepSpeed's CPU op built)
        preflight(backend.name, backend.uses_deepspeed, backend.lock_wait_s)
    except EnvironmentFault as exc:
        return [new_row(f, "error", f"environment: {exc}") for f in figures]
    threads = max(1, plan.threads // world)
    tokens = tuple(f.tokens for f in figures)
    job = StepJob(
        entry,
        backend.strategy,
        backend.leaf,
        backend.dense,
        dtype,
        tokens,
        plan.warmup,
        plan.repeat,
        plan.budget_s,
        plan.seed,
    )
    deadline = STARTUP_S + CALIBRATION_S + len(figures) * (2 * plan.budget_s + 60)
    env = {"DS_ACCELERATOR": "cpu", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": str(threads)}
    note(f"{world} ranks x {threads} thread(s): {backend.name} training steps at {describe_sizes(entry.spec)}")
    result = run_ranks(f"{__name__}:time_training_steps", (job,), world_size=world, deadline_s=deadline, env=env)
    if not result.ok:
        cause = environment_verdict(result) or headline(result)
        return [new_row(f, "error", f"ranks failed: {cause}") for f in figures]
    report: RankReport = result.results[0]
    return [
        _row(new_row(f, t.status, t.message), entry, dtype, t, report, world) for f, t in zip(figures, report.timings)
    ]


def _row(row: BenchRow, entry: ArchEntry, dtype: str, timing: StepTiming, report: RankReport, world: int) -> BenchRow:
    """Fill a step row: totals over ranks, the limit of one rank's share."""
    spec, tokens = entry.spec, timing.tokens
    width = torch.empty((), dtype=DTYPES[dtype]).element_size()
    touched = (
        timing.experts_touched if timing.experts_touched is not None else min(spec.num_experts, tokens * spec.top_k)
    )
    flops_rank = pass_flops(spec, tokens, "fwdbwd", "step")
    bytes_rank = pass_bytes(spec, tokens, touched, "fwdbwd", "step", width).total
    assert report.bandwidth is not None
    where = f"rank 0 of {row.backend}"
    gemm = report_calibration(dataclasses.replace(report.gemm[tokens], where=where))
    bandwidth = report_calibration(dataclasses.replace(report.bandwidth, where=where))
    compute_s, memory_s = flops_rank / gemm.per_s, bytes_rank / bandwidth.per_s
    row.level, row.world_size, row.threads = "step", world, report.threads
    row.experts_touched, row.peak_mem_bytes = touched, timing.peak_mem_bytes
    row.limit_bound = "compute" if compute_s >= memory_s else "memory"
    stats = Timing(timing.samples_s, 1, timing.status, timing.message, report.threads)
    row.samples, row.calls_per_sample = len(timing.samples_s), 1
    median = stats.median_s
    if median is not None:
        row.with_measurements(median, world * flops_rank, world * bytes_rank, max(compute_s, memory_s), world)
        row.iqr_s = stats.iqr_s
    else:
        row.flops, row.bytes, row.limit_s = world * flops_rank, world * bytes_rank, max(compute_s, memory_s)
    return row
