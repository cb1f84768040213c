"""The roofline a figure is judged against, measured on this machine in this process.

``limit_s = max(FLOPs / GEMM throughput, bytes / memory bandwidth)``; ``ratio_to_limit = limit_s /
median_s`` (1.0: the pass runs at the speed of a dense matmul chain or of a large copy, whichever binds).

- GEMM throughput: the better of two chains of square matmuls ``x ← x @ W`` (``[D, D] @ [D, D]``,
  ping-pong buffers, no allocation; the class's side, and the next smaller class's side run twice as
  long) with the figure's FLOPs and dtype, on the same device with the same thread count. Same
  FLOPs, because a small pass cannot reach a large GEMM's throughput either (launch and dispatch cost
  are part of the limit). FLOPs are bucketed into size classes of powers of two; beyond a device's
  largest class (CPU 2^34 ≈ 17 GFLOP, accelerators 2^44) the chain is measured at that class: a dense
  chain is at its steady throughput long before.
- Memory bandwidth: the better of a copy (``2·bytes`` moved) and a sum (``bytes`` read) of a buffer far
  larger than the caches (CPU 256 MiB, accelerators 2 GiB).

Both are the fastest block of ``torch.utils.benchmark.Timer.blocked_autorange`` (a limit is what the
machine can do). Each calibration is cached per (device, dtype, kind, size class, threads) for the life of the process
and listed in the report's environment.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch.utils.benchmark import Timer

from moeconf.devices import DTYPES

CalibrationKind = Literal["gemm", "bandwidth"]
Bound = Literal["compute", "memory"]

MIN_CLASS = 12
MAX_CLASS = {"cpu": 34}
MAX_CLASS_ACCELERATOR = 44
MAX_SIDE = {"cpu": 2048}
MAX_SIDE_ACCELERATOR = 8192
MIN_SIDE = 16
SIDE_MULTIPLE = 16
"""Chain sides are multiples of this (BLAS kernels tile in 8s and 16s)."""
CHAIN_LENGTH = 4
"""Matmuls in a chain (at least; more when the side is capped)."""
BANDWIDTH_BYTES = {"cpu": 256 * 2**20}
BANDWIDTH_BYTES_ACCELERATOR = 2 * 2**30
MIN_RUN_S = 0.3
"""``blocked_autorange`` measures each calibration for at least this long."""


@dataclass(frozen=True)
class Calibration:
    """One measured limit: ``per_s`` FLOP/s (``gemm``) or bytes/s (``bandwidth``)."""

    device: str
    dtype: str
    kind: CalibrationKind
    size_class: str
    per_s: float
    detail: str
    threads: int
    where: str = "bench process"
    """Which process measured it (multi-rank figures are judged against rank 0's)."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Limit:
    """The roofline of one figure."""

    limit_s: float
    bound: Bound
    compute_s: float
    memory_s: float
    gemm: Calibration
    bandwidth: Calibration


_CACHE: dict[tuple[str, str, str, str, int], Calibration] = {}
_REPORTED: dict[tuple[str, str, str, str, int, str], Calibration] = {}


def calibrations() -> list[Calibration]:
    """Every calibration the figures of this run were judged against, in order."""
    return list(_REPORTED.values())


def report_calibration(calibration: Calibration) -> Calibration:
    """List a calibration (made here or in a rank process) in the report's environment."""
    c = calibration
    _REPORTED.setdefault((c.device, c.dtype, c.kind, c.size_class, c.threads, c.where), c)
    return c


def gemm_size_class(flops: float, device: str) -> int:
    """``ceil(log2(flops))`` clamped to the device's classes."""
    top = MAX_CLASS.get(device, MAX_CLASS_ACCELERATOR)
    return min(top, max(MIN_CLASS, math.ceil(math.log2(max(flops, 1.0)))))


def chain_shape(size_class: int, device: str) -> tuple[int, int]:
    """``(side D, length L)`` of a chain of about ``2**size_class`` FLOPs (``L·2·D³``)."""
    flops = 2.0**size_class
    top = MAX_SIDE.get(device, MAX_SIDE_ACCELERATOR)
    side = (flops / (2 * CHAIN_LENGTH)) ** (1 / 3)
    side = int(min(top, max(MIN_SIDE, round(side / SIDE_MULTIPLE) * SIDE_MULTIPLE)))
    length = max(1, round(flops / (2 * side**3)))
    return side, length


def _best_s(fn: Callable[[], object], threads: int) -> float:
    """Seconds per call of the fastest block of ``blocked_autorange``.

    NOTE: the fastest, not the median: a limit is what the machine can do, and on a shared machine the
    median of a calibration taken during someone else's burst would put the limit below the figures.
    """
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return float(min(timer.blocked_autorange(min_run_time=MIN_RUN_S).times))


def _matmul_chain(side: int, length: int, dtype: torch.dtype, device: str) -> Callable[[], None]:
    generator = torch.Generator().manual_seed(0)
    # NOTE: an orthogonal W keeps x at unit scale however often the chain runs (blocked_autorange calls
    # it many times on the same buffers): a Gaussian W would let x drift towards denormals, which are
    # orders of magnitude slower on CPUs.
    weight, _ = torch.linalg.qr(torch.randn(side, side, generator=generator, dtype=torch.float64))
    weight = weight.to(device=device, dtype=dtype)
    ping = torch.randn(side, side, generator=generator).to(device=device, dtype=dtype)
    pong = torch.empty_like(ping)

    def run() -> None:
        x, y = ping, pong
        for _ in range(length):
            torch.mm(x, weight, out=y)
            x, y = y, x

    return run


def chain_shapes(size_class: int, device: str) -> list[tuple[int, int]]:
    """The chains tried for a size class: its own square shape, and the next smaller class's shape run
    twice as long (the same FLOPs in smaller matmuls, which some BLAS sizes run faster)."""
    side, length = chain_shape(size_class, device)
    smaller_side, smaller_length = chain_shape(max(MIN_CLASS, size_class - 1), device)
    return list(dict.fromkeys([(side, length), (smaller_side, 2 * smaller_length)]))


def gemm_throughput(device: str, dtype: str, flops: float, threads: int) -> Calibration:
    """FLOP/s of the best dense matmul chain of about ``flops`` FLOPs (cached per size class).

    NOTE: the better of two chain shapes (``chain_shapes``): a limit must not drop because one square
    size happens to suit the BLAS library badly, or a larger pass would look better than its limit.
    """
    size_class = gemm_size_class(flops, device)
    key = (device, dtype, "gemm", str(size_class), threads)
    if key not in _CACHE:
        best: tuple[float, str] | None = None
        for side, length in chain_shapes(size_class, device):
            seconds = _best_s(_matmul_chain(side, length, DTYPES[dtype], device), threads)
            per_s = length * 2.0 * side**3 / seconds
            detail = f"{length} x mm [{side},{side}]@[{side},{side}] {dtype}: {seconds * 1e3:.3g} ms"
            if best is None or per_s > best[0]:
                best = (per_s, detail)
        assert best is not None
        _CACHE[key] = Calibration(device, dtype, "gemm", f"2^{size_class}", best[0], best[1], threads)
    return report_calibration(_CACHE[key])


def memory_bandwidth(device: str, dtype: str, threads: int) -> Calibration:
    """Bytes/s of the better of a large copy and a large sum (cached)."""
    nbytes = BANDWIDTH_BYTES.get(device, BANDWIDTH_BYTES_ACCELERATOR)
    key = (device, dtype, "bandwidth", str(nbytes), threads)
    if key not in _CACHE:
        torch_dtype = DTYPES[dtype]
        numel = nbytes // torch.empty((), dtype=torch_dtype).element_size()
        source = torch.ones(numel, dtype=torch_dtype, device=device)
        target = torch.empty_like(source)
        copy_s = _best_s(lambda: target.copy_(source), threads)
        sum_s = _best_s(lambda: source.sum(), threads)
        del source, target
        copy_bw, sum_bw = 2 * nbytes / copy_s, nbytes / sum_s
        _CACHE[key] = Calibration(
            device,
            dtype,
            "bandwidth",
            f"{nbytes // 2**20} MiB",
            max(copy_bw, sum_bw),
            f"copy {copy_bw / 1e9:.3g} GB/s, sum {sum_bw / 1e9:.3g} GB/s",
            threads,
        )
    return report_calibration(_CACHE[key])


def roofline_limit(flops: float, nbytes: float, device: str, dtype: str, threads: int) -> Limit:
    """The figure's limit from both calibrations (measured now if not cached)."""
    gemm = gemm_throughput(device, dtype, flops, threads)
    bandwidth = memory_bandwidth(device, dtype, threads)
    compute_s, memory_s = flops / gemm.per_s, nbytes / bandwidth.per_s
    bound: Bound = "compute" if compute_s >= memory_s else "memory"
    return Limit(max(compute_s, memory_s), bound, compute_s, memory_s, gemm, bandwidth)
