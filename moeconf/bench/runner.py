"""The bench engine: a plan (what the command line asked for) → rows, one per figure.

For each (architecture, preset) the registry entry is resized (``presets.sized_entry``); for each dtype
and backend: the backend's capability (``backend_reason``, ``figure_reason``), then the parity gate at the
tiny config (``gate.parity_gate``), then the figures: single-process backends on their prepared block
(``single``), multi-rank backends as training steps on several ranks (``multirank``). ``moeconf bench``
and the perf suite both run this.
"""

from __future__ import annotations

import gc
import itertools
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import torch
from torch.utils.benchmark.utils.common import set_torch_threads

from moeconf.backends import Backend, resolve_backend
from moeconf.backends.base import is_multi_rank
from moeconf.bench.flops import Pass, pass_bytes, pass_flops
from moeconf.bench.gate import GateStatus, parity_gate
from moeconf.bench.memory import PeakMemory, available_bytes, cpu_allocation_cap, host_available_bytes, is_out_of_memory
from moeconf.bench.presets import PRESETS, describe_sizes, preset_sizes, sized_entry, weight_count
from moeconf.bench.report import seconds
from moeconf.bench.roofline import roofline_limit
from moeconf.bench.routing import Routing, RoutingError, expert_loads
from moeconf.bench.rows import BenchRow, ReproOptions, RowStatus, repro_command
from moeconf.bench.single import TimedCall, block_call, experts_call, prepare_block
from moeconf.bench.timing import measure
from moeconf.devices import DTYPES
from moeconf.registry import get_entry
from moeconf.registry.entry import ArchEntry

GiB = 2**30
PROGRESS_MESSAGE_CHARS = 160
GATE_TO_ROW: dict[GateStatus, RowStatus] = {
    "failed": "not_timed",  # a wrong kernel gets no speed
    "setup": "error",  # the machine kept the gate from judging
    "unsupported": "unsupported",
    "passed": "timed",
}


@dataclass(frozen=True)
class Figure:
    """What varies within one (arch, preset, backend, dtype): the pass, the routing, the token count."""

    pass_: Pass
    routing: Routing
    tokens: int


@dataclass(frozen=True)
class BenchPlan:
    """Everything ``moeconf bench`` was asked for (validated)."""

    targets: tuple[tuple[str, str], ...]
    """``(arch, preset)`` pairs."""
    backends: tuple[str, ...]
    dtypes: tuple[str, ...]
    passes: tuple[Pass, ...]
    routings: tuple[Routing, ...]
    tokens: tuple[int, ...]
    device: str
    repeat: int
    warmup: int
    budget_s: float
    scale: float
    threads: int
    seed: int = 0
    program: str = "moeconf"

    def figures(self) -> list[Figure]:
        return [Figure(p, r, n) for p, r, n in itertools.product(self.passes, self.routings, self.tokens)]

    def total_rows(self) -> int:
        return len(self.targets) * len(self.dtypes) * len(self.backends) * len(self.figures())

    def repro_options(self) -> ReproOptions:
        return ReproOptions(self.program, self.repeat, self.warmup, self.budget_s, self.threads, self.scale, self.seed)


@dataclass(frozen=True)
class Target:
    """An architecture at a preset's sizes."""

    arch: str
    preset: str
    entry: ArchEntry


class Progress:
    """Progress lines on stderr: notes, and one line per finished figure with a running count."""

    def __init__(self, total: int, write: Callable[[str], None] | None = None) -> None:
        self.total = total
        self.done = 0
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))

    def note(self, message: str) -> None:
        self.write(f"  {message}")

    def row(self, row: BenchRow) -> None:
        self.done += 1
        figure = f"{row.pass_} {row.routing} N={row.tokens}"
        head = f"[{self.done}/{self.total}] {row.arch} {row.backend} {row.preset} {row.dtype} {row.device} {figure}"
        line = f"{head}: {row.status}"
        if row.median_s is not None:
            line += f" {seconds(row.median_s)}"
            line += f", {row.ratio_to_limit:.2f} of limit" if row.ratio_to_limit is not None else ""
        if row.message:
            first = row.message.splitlines()[0]
            line += f" ({first[:PROGRESS_MESSAGE_CHARS]}{'...' if len(first) > PROGRESS_MESSAGE_CHARS else ''})"
        self.write(line)


def target_of(arch: str, preset: str, scale: float) -> Target:
    """The registry entry of ``arch`` resized to ``preset`` (``PresetError`` if it cannot be)."""
    entry = get_entry(arch)
    return Target(arch, preset, sized_entry(entry, preset_sizes(PRESETS[preset], entry.spec, scale)))


def _emulated_off_device(backend: Backend, device: str) -> bool:
    from moeconf.backends.npu_gmm import NpuGmmBackend

    return isinstance(backend, NpuGmmBackend) and device != "npu"


def backend_reason(backend: Backend, entry: ArchEntry, dtype: str, device: str) -> str | None:
    """None when ``backend`` can be timed on ``entry`` here, else why not (an ``unsupported`` row)."""
    if dtype not in backend.dtypes:
        return f"{backend.name} does not run {dtype}"
    if is_multi_rank(backend):
        from moeconf.backends.partitioned import PartitionedBackend

        if not isinstance(backend, PartitionedBackend):
            return "only DeepSpeed/FSDP2 PartitionedBackend multi-rank backends are timed (per training step)"
    elif not callable(getattr(backend, "prepare", None)):
        return "the backend has no prepare(request) -> module to time (HFBlockBackend and its subclasses have one)"
    if _emulated_off_device(backend, device):
        return (
            f"{backend.name} is timed on an NPU only (elsewhere it runs moeconf's pure-torch emulator of the NPU ops)"
        )
    return backend.supports(entry, dtype, device)


def figure_reason(backend: Backend, entry: ArchEntry, figure: Figure) -> str | None:
    """None when this figure can be timed for a supported backend, else why not."""
    if is_multi_rank(backend):
        if figure.pass_ != "fwdbwd":
            return "multi-rank backends are timed per training step (--pass fwdbwd)"
        if figure.routing != "natural":
            return "multi-rank backends are timed with natural routing (imposed routing is timed at the experts call)"
        return None
    if figure.routing == "natural":
        return None
    if entry.routing_from != "experts_call":
        return (
            f"routing cannot be imposed: {entry.block_class} does not pass it to its experts as "
            f"(hidden, top_k_index, top_k_weights) (routing_from={entry.routing_from})"
        )
    try:
        expert_loads(figure.routing, figure.tokens, entry.spec.num_experts, entry.spec.top_k)
    except RoutingError as exc:
        return f"routing {figure.routing}: {exc}"
    return None


class RowFactory:
    """Rows of one (target, backend, dtype), each with its repro line."""

    def __init__(self, plan: BenchPlan, target: Target, backend: str, dtype: str) -> None:
        self.plan, self.target, self.backend, self.dtype = plan, target, backend, dtype

    def __call__(self, figure: Figure, status: RowStatus, message: str = "") -> BenchRow:
        row = BenchRow(
            arch=self.target.arch,
            backend=self.backend,
            preset=self.target.preset,
            dtype=self.dtype,
            device=self.plan.device,
            pass_=figure.pass_,
            routing=figure.routing,
            tokens=figure.tokens,
            status=status,
            sizes=describe_sizes(self.target.entry.spec),
            scale=self.plan.scale,
            message=message,
        )
        row.repro = repro_command(row, self.plan.repro_options())
        return row


def run_plan(plan: BenchPlan, progress: Progress | None = None) -> Iterator[BenchRow]:
    """Every row of the plan, in order; progress on stderr as figures finish."""
    progress = progress or Progress(plan.total_rows())
    backends = {name: resolve_backend(name) for name in plan.backends}
    for arch, preset in plan.targets:
        target = target_of(arch, preset, plan.scale)
        for dtype in plan.dtypes:
            for name, backend in backends.items():
                yield from backend_rows(plan, target, name, backend, dtype, progress)


def backend_rows(
    plan: BenchPlan, target: Target, name: str, backend: Backend, dtype: str, progress: Progress
) -> Iterator[BenchRow]:
    """Rows of one backend on one target and dtype: capability, parity gate, then the timed figures."""
    new_row = RowFactory(plan, target, name, dtype)

    def emit(rows: list[BenchRow]) -> Iterator[BenchRow]:
        for row in rows:
            progress.row(row)
            yield row

    figures = plan.figures()
    reason = backend_reason(backend, target.entry, dtype, plan.device)
    if reason is not None:
        yield from emit([new_row(f, "unsupported", reason) for f in figures])
        return
    runnable: list[Figure] = []
    for figure in figures:
        why = figure_reason(backend, target.entry, figure)
        if why is None:
            runnable.append(figure)
        else:
            yield from emit([new_row(figure, "unsupported", why)])
    if not runnable:
        return
    progress.note(f"parity gate: {target.arch} {name} {dtype} {plan.device} (tiny config)")
    verdict = parity_gate(target.arch, name, dtype, plan.device, plan.program)
    if verdict.status != "passed":
        yield from emit([new_row(f, GATE_TO_ROW[verdict.status], verdict.message) for f in runnable])
        return
    if is_multi_rank(backend):
        from moeconf.backends.partitioned import PartitionedBackend
        from moeconf.bench.multirank import step_rows

        partitioned = cast(PartitionedBackend, backend)  # backend_reason admitted only these
        yield from emit(step_rows(plan, target, partitioned, dtype, runnable, new_row, progress.note))
        return
    yield from single_process_rows(plan, target, backend, dtype, runnable, new_row, progress)


def memory_shortfall(entry: ArchEntry, dtype: str, device: str, backward: bool) -> str | None:
    """Why the weights cannot even be built here, or None.

    Counted: the fp32 block ``build_block`` makes on the host, the canonical parameters in ``dtype``
    loaded into it, and on the compute device the weights (and their gradients with a backward).
    """
    count = weight_count(entry.spec)
    width = torch.empty((), dtype=DTYPES[dtype]).element_size()
    host = count * (4 + width)
    on_device = count * width * (2 if backward else 1)
    if device == "cpu":  # the build (plus a cast copy for bf16), or the weights and their gradients
        host = max(host + (count * width if width != 4 else 0), on_device)
    needs = [("host", host, host_available_bytes())]
    if device != "cpu":
        needs.append((device, on_device, available_bytes(device)))
    for where, need, have in needs:
        if have is not None and need > have:
            return (
                f"{describe_sizes(entry.spec)}: {weight_count(entry.spec) / 1e9:.2f} G parameters need "
                f"≈ {need / GiB:.1f} GiB on the {where}, {have / GiB:.1f} GiB available (try --scale)"
            )
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def failure_status(exc: BaseException) -> tuple[RowStatus, str]:
    """How a backend's exception is reported: running out of memory is a budget the machine sets
    (``over_budget``: e.g. transformers' batched_mm copies the weights per token), anything else is the
    backend's ``error``."""
    return ("over_budget", "out of memory") if is_out_of_memory(exc) else ("error", "raised")


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    elif device == "npu" and hasattr(torch, "npu"):
        torch.npu.empty_cache()


def single_process_rows(
    plan: BenchPlan,
    target: Target,
    backend: Backend,
    dtype: str,
    figures: list[Figure],
    new_row: RowFactory,
    progress: Progress,
) -> Iterator[BenchRow]:
    """Build the backend's block once, then time each figure on it."""
    shortfall = memory_shortfall(target.entry, dtype, plan.device, any(f.pass_ == "fwdbwd" for f in figures))
    if shortfall is not None:
        for figure in figures:
            row = new_row(figure, "over_budget", f"not run: {shortfall}")
            progress.row(row)
            yield row
        return
    progress.note(f"building {target.arch} at {describe_sizes(target.entry.spec)} for {backend.name} {dtype}")
    rows: list[BenchRow] = []
    with cpu_allocation_cap(plan.device):
        try:
            block = prepare_block(backend, target.entry, dtype, plan.device, plan.seed)
        except Exception as exc:  # noqa: BLE001 - the backend's failure to build is its row's error
            block = None
            status, what = failure_status(exc)
            rows = [new_row(f, status, f"{what} while building the block: {_one_line(exc)}") for f in figures]
            for row in rows:
                progress.row(row)
        if block is not None:
            # NOTE: a call does not get faster with more tokens: the slowest call seen at fewer tokens (same
            # pass and routing) bounds the next figure's, so a figure that cannot fit is not started.
            slowest: dict[tuple[str, str], tuple[float, int]] = {}
            for figure in sorted(figures, key=lambda f: (f.pass_, f.routing, f.tokens)):
                seen = slowest.get((figure.pass_, figure.routing))
                row = time_figure(plan, target, block, dtype, figure, new_row, seen)
                progress.row(row)
                rows.append(row)
                if row.median_s is not None and (seen is None or row.median_s > seen[0]):
                    slowest[(figure.pass_, figure.routing)] = (row.median_s, row.tokens)
                _release(plan.device)
        del block
    _release(plan.device)
    yield from rows


def time_figure(
    plan: BenchPlan,
    target: Target,
    block: torch.nn.Module,
    dtype: str,
    figure: Figure,
    new_row: RowFactory,
    slower_than: tuple[float, int] | None = None,
) -> BenchRow:
    """One single-process figure: the call, its counts and roofline, the timed runs, peak memory.

    ``slower_than``: ``(seconds, tokens)`` of one call of the same pass and routing at fewer tokens, a
    lower bound of this figure's call.
    """
    row = new_row(figure, "timed")
    entry, torch_dtype, device = target.entry, DTYPES[dtype], plan.device
    row.threads = plan.threads
    try:
        with set_torch_threads(plan.threads):
            timed: TimedCall
            if figure.routing == "natural":
                timed = block_call(entry, block, figure.tokens, figure.pass_, torch_dtype, device, plan.seed)
            else:
                timed = experts_call(
                    entry, block, figure.routing, figure.tokens, figure.pass_, torch_dtype, device, plan.seed
                )
            row.level, row.experts_touched = timed.level, timed.experts_touched
            flops = pass_flops(entry.spec, figure.tokens, figure.pass_, timed.level)
            width = torch.empty((), dtype=torch_dtype).element_size()
            nbytes = pass_bytes(entry.spec, figure.tokens, timed.experts_touched, figure.pass_, timed.level, width)
            limit = roofline_limit(flops, nbytes.total, device, dtype, plan.threads)
            row.flops, row.bytes, row.limit_s, row.limit_bound = flops, nbytes.total, limit.limit_s, limit.bound
            bound, reason = limit.limit_s, "at the measured limits"
            if slower_than is not None and slower_than[0] > bound:
                bound, reason = slower_than[0], f"one call at N={slower_than[1]} took {slower_than[0]:.3g} s"
            with PeakMemory(device) as memory:
                timing = measure(
                    timed.call,
                    warmup=plan.warmup,
                    repeat=plan.repeat,
                    budget_s=plan.budget_s,
                    lower_bound_s=bound,
                    lower_bound_reason=reason,
                    threads=plan.threads,
                    label=f"{row.arch} {row.backend} {row.preset} {row.pass_} {row.routing} N={row.tokens}",
                )
    except Exception as exc:  # noqa: BLE001 - a backend that raises while timed gets an error row
        row.status, what = failure_status(exc)
        row.message = f"{what}: {_one_line(exc)}"
        return row
    row.status = timing.status
    row.message = "; ".join(m for m in (timed.note, timing.message) if m)
    row.samples, row.calls_per_sample = len(timing.samples_s), timing.calls_per_sample
    row.peak_mem_bytes = memory.peak_bytes
    if timing.median_s is not None:
        row.with_measurements(timing.median_s, flops, nbytes.total, limit.limit_s)
        row.iqr_s = timing.iqr_s
    return row


def default_threads() -> int:
    """``MOECONF_THREADS`` if set, else every core this process may run on."""
    if os.environ.get("MOECONF_THREADS"):
        return max(1, int(os.environ["MOECONF_THREADS"]))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
