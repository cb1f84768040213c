"""Peak memory of a pass, and a cap that turns a CPU allocation beyond the machine into an error.

What ``peak_mem_bytes`` is: the memory a pass needs *on top of* what was held before its first run
(weights, inputs), i.e. activations, gradients and workspaces at their peak.

- CUDA / NPU: the caching allocator's peak (``max_memory_allocated`` after ``reset_peak_memory_stats``)
  minus what was allocated before.
- CPU: the process's resident-set high-water mark minus its resident set before. The mark
  (``VmHWM`` in ``/proc/self/status``) is reset first by writing ``5`` to ``/proc/self/clear_refs``
  (Linux ≥ 4.0). Where that is not allowed, ``ru_maxrss`` is used and the figure only counts what went
  above the process's earlier peak (the method string says so). tracemalloc would see none of it: torch
  allocates outside Python's allocator.
"""

from __future__ import annotations

import contextlib
import re
import resource
from collections.abc import Iterator
from pathlib import Path

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
ADDRESS_SPACE_HEADROOM = 0.9
"""Fraction of the available memory a CPU figure may take before an allocation fails."""


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_rss_high_water_mark() -> bool:
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _accelerator(device: str) -> object | None:
    if device == "cuda":
        return torch.cuda
    if device == "npu":
        return getattr(torch, "npu", None)
    return None


def peak_memory_method(device: str) -> str:
    """One line saying what ``peak_mem_bytes`` measures on ``device`` here."""
    if _accelerator(device) is not None:
        return f"{device} caching allocator: max_memory_allocated - memory_allocated before the runs"
    if CLEAR_REFS.exists() and _status_kib("VmHWM") is not None:
        return "CPU RSS: VmHWM (reset via /proc/self/clear_refs) - VmRSS before the runs"
    return "CPU RSS: ru_maxrss - RSS before the runs (only growth above the process's earlier peak)"


class PeakMemory:
    """Context manager around the runs of one figure; ``peak_bytes`` afterwards."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_bytes: int | None = None
        self._before = 0
        self._reset = False

    def __enter__(self) -> PeakMemory:  # noqa: PYI034 - Self needs Python 3.11
        acc = _accelerator(self.device)
        if acc is not None:
            acc.synchronize()  # type: ignore[attr-defined]
            acc.reset_peak_memory_stats()  # type: ignore[attr-defined]
            self._before = int(acc.memory_allocated())  # type: ignore[attr-defined]
        else:
            self._reset = _reset_rss_high_water_mark()
            self._before = (_status_kib("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        acc = _accelerator(self.device)
        if acc is not None:
            acc.synchronize()  # type: ignore[attr-defined]
            peak = int(acc.max_memory_allocated())  # type: ignore[attr-defined]
        elif self._reset:
            peak = (_status_kib("VmHWM") or 0) * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_bytes = max(0, peak - self._before)


def available_bytes(device: str) -> int | None:
    """Free memory for a figure: the accelerator's free memory, or the host's available memory."""
    acc = _accelerator(device)
    if acc is not None:
        free, _total = acc.mem_get_info()  # type: ignore[attr-defined]
        return int(free)
    kib = _meminfo_kib("MemAvailable")
    return None if kib is None else kib * 1024


def host_available_bytes() -> int | None:
    kib = _meminfo_kib("MemAvailable")
    return None if kib is None else kib * 1024


def _meminfo_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


@contextlib.contextmanager
def cpu_allocation_cap(device: str) -> Iterator[None]:
    """On CPU, cap the address space at what is mapped now plus 90 % of the available memory.

    NOTE why: some backends gather weights per token (transformers' ``batched_mm`` indexes
    ``gate_up_proj[expert_ids]``: ``N·k × 2I × H`` values), which at prefill sizes is hundreds of GB.
    Without the cap the kernel's OOM killer ends the whole benchmark; with it the allocation raises and
    the figure is reported as an error. Accelerators raise on their own (out of memory).
    """
    vm_kib, available = _status_kib("VmSize"), host_available_bytes()
    if device != "cpu" or vm_kib is None or available is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm_kib * 1024 + int(available * ADDRESS_SPACE_HEADROOM)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure of torch (CPU or accelerator) or Python."""
    text = str(exc)
    return isinstance(exc, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text
