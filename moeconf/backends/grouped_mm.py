"""``grouped-mm``: the experts as a grouped matmul (CPU and CUDA), structured like the reference
dispatch: stable sort by expert, grouped matmul, SwiGLU, grouped matmul, weighted scatter back.

It is the fast reference-structured path and the baseline of the performance suite, so it has to be
near the roofline on both devices:

* CUDA runs ``torch._grouped_mm`` in bf16, autograd for the backward (the transposed weight views
  are free there: the kernel reads either layout).
* CPU runs the same steps through ``GroupedExperts``, an autograd function with a hand-written
  backward, and parallelises each grouped matmul *across experts*: every touched expert is one
  single-threaded task, the tasks are shared out, largest first, between ``torch.get_num_threads()``
  threads. Why not ``torch._grouped_mm`` on CPU (or one multi-threaded ``mm`` per expert, which is
  what its CPU fallback does): with a handful of rows per expert (decode: ~2) a multi-threaded GEMM
  splits a tiny problem, and every call is an OpenMP fork/join; measured on the 2-core box, the same
  decode forward ran 2.4x faster single-threaded than with 2 threads per call, and on a shared
  machine with libgomp's default spin-waiting each fork/join cost ~16 ms. Expert-parallel tasks
  have no fork/join inside, keep every weight read by one core, and give prefill each core whole
  GEMMs (about the dense rate).

The backward touches routed experts only: each touched expert's weight gradient is written once,
by its own ``mm``, straight into the gradient tensor; untouched experts are zero-filled (exact zeros)
instead of zero-filling all ``E`` and adding into them.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from moeconf.backends.fused_experts import FusedExpertsBackend
from moeconf.registry.entry import ArchEntry

Segment = tuple[int, int, int]
"""``(expert, start, stop)``: the expert's rows in the expert-sorted order."""


def _onednn_linear() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """oneDNN's inner product (the op Inductor lowers CPU linears to), if this torch build has it.

    Why not ``torch.mm(x, w.t())`` for the forward: MKL's sgemm on a few rows times a transposed
    ``[N, K]`` weight is far from the memory bandwidth. Measured single-threaded on this CPU, in GB/s
    of weight per CPU-second: 2-3 rows 6-8 (MKL) vs 11-12 (oneDNN), a plain ``sum`` streams 25-28; at
    ~128 rows the grouped forward reached 0.75 (MKL) vs 0.95 (oneDNN) of a dense ``mm``'s FLOP rate.
    (oneDNN's backward primitives measured no better than MKL, so the backward stays on ``mm``.)
    """
    try:
        op = torch.ops.mkldnn._linear_pointwise.default
        if not torch.backends.mkldnn.is_available():
            return None
        if not torch.equal(op(torch.ones(2, 3), torch.ones(4, 3), None, "none", [], ""), torch.full((2, 4), 3.0)):
            return None
    except (AttributeError, RuntimeError):
        return None
    return lambda x, w: op(x, w, None, "none", [], "")


ONEDNN_LINEAR = _onednn_linear()
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


class ExpertThreads:
    """Runs per-expert tasks on ``torch.get_num_threads()`` OS threads, each kernel single-threaded.

    The calling thread works too; the others come from a pool kept for the process (dropped in a
    forked child, whose copy would have no threads behind it). While the tasks run, the caller's
    intra-op thread count is 1 (restored after): torch's setting is per OS thread, but MKL's is
    process-wide, so setting it only in the pool threads would not be enough.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._size = 0
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._pool, self._size, self._lock = None, 0, threading.Lock()

    def _executor(self, helpers: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._size < helpers:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(helpers, thread_name_prefix="moeconf-grouped-mm")
                self._size = helpers
            return self._pool

    def run(self, tasks: Sequence[Callable[[], object]]) -> None:
        """Run ``tasks`` (hand them largest first: a shared queue then balances the threads), all
        under the caller's grad mode."""
        threads = min(torch.get_num_threads(), len(tasks))
        if threads <= 1:
            for task in tasks:
                task()
            return
        queue, lock = iter(tasks), threading.Lock()
        grad_enabled = torch.is_grad_enabled()  # thread-local: a pool thread would have its own

        def drain() -> None:
            if torch.get_num_threads() != 1:  # per OS thread: set once per pool thread
                torch.set_num_threads(1)
            with torch.set_grad_enabled(grad_enabled):
                while True:
                    with lock:
                        task = next(queue, None)
                    if task is None:
                        return
                    task()

        caller_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        futures: list[Future[None]] = []
        try:
            pool = self._executor(threads - 1)
            futures = [pool.submit(drain) for _ in range(threads - 1)]
            drain()
        finally:
            for future in futures:  # wait for all before restoring, and re-raise a helper's error
                future.result()
            torch.set_num_threads(caller_threads)


EXPERT_THREADS = ExpertThreads()


HUGE_PAGE = 2 << 20
HUGEPAGE_MIN_BYTES = 64 << 20


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _libc_madvise()


def empty_hugepage(*shape: int, like: torch.Tensor) -> torch.Tensor:
    """``torch.empty`` (dtype/device of ``like``), advised to be backed by transparent huge pages.

    Why: the weight gradients are fresh ``[E, 2I, H]`` / ``[E, H, I]`` tensors on every backward (2.4 GB
    for qwen3-30b-a3b), and the first write to fresh memory page-faults it in 4 KiB at a time. On the
    2-core VM that first touch cost more than the gradient maths: decode forward+backward took 1174 ms
    against 530 ms with 2 MiB pages (PyTorch's own allocator does the same under
    ``THP_MEM_ALLOC_ENABLE=1``, an environment setting this backend cannot rely on). Only a hint: no
    effect where THP is off, the tensor is small, or the platform is not Linux.
    """
    out = torch.empty(*shape, dtype=like.dtype, device=like.device)
    nbytes = out.numel() * out.element_size()
    if _MADVISE is not None and out.device.type == "cpu" and nbytes >= HUGEPAGE_MIN_BYTES:
        start = -(-out.data_ptr() // HUGE_PAGE) * HUGE_PAGE  # the 2 MiB-aligned part of the buffer
        stop = (out.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
        _MADVISE(start, stop - start, mmap.MADV_HUGEPAGE)  # failure only means 4 KiB pages
    return out


@dataclass(frozen=True)
class ExpertDispatch:
    """A stable sort of the ``N·k`` routed (token, slot) pairs by expert, for the CPU path.

    Attributes:
        segments: ``(expert, start, stop)`` of every expert with rows, largest first.
        order: ``[N·k]`` flat slot (``token·k + slot``) held by each sorted row.
        sorted_token: ``[N·k]`` source token of each sorted row.
        slot_row: ``[N·k]`` sorted row of each flat slot (the inverse permutation).
        untouched: experts without rows: their weight gradients are exact zeros.
    """

    segments: list[Segment]
    order: torch.Tensor
    sorted_token: torch.Tensor
    slot_row: torch.Tensor
    untouched: list[int]


def expert_dispatch(top_k_index: torch.Tensor, num_experts: int) -> ExpertDispatch:
    """Stable sort of ``top_k_index [N, k]`` by expert; ties keep ascending flat slot."""
    k = top_k_index.shape[1]
    flat = top_k_index.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # the one host sync of the layer
    segments, start = [], 0
    for e, n in enumerate(counts):
        if n:
            segments.append((e, start, start + n))
        start += n
    segments.sort(key=lambda s: s[1] - s[2])  # largest first (stable: ties in expert order)
    slot_row = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))
    untouched = [e for e, n in enumerate(counts) if not n]
    return ExpertDispatch(segments, order, order // k, slot_row, untouched)


def grouped_linear(rows: torch.Tensor, weight: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
    """``rows [M, K]`` (sorted by expert) times ``weight[e]ᵀ`` for ``weight [E, N, K]`` → ``[M, N]``.

    One task per touched expert on a contiguous slice of the weight (no transposed copy of all ``E``
    experts). Every row belongs to a segment, so ``torch.empty`` is fully overwritten.
    """
    out = empty_hugepage(rows.shape[0], weight.shape[1], like=rows)
    onednn = ONEDNN_LINEAR if rows.dtype in ONEDNN_DTYPES and weight.is_contiguous() else None

    def task(e: int, start: int, stop: int) -> Callable[[], object]:
        if onednn is not None:
            return lambda: out[start:stop].copy_(onednn(rows[start:stop], weight[e]))
        return lambda: torch.mm(rows[start:stop], weight[e].t(), out=out[start:stop])

    EXPERT_THREADS.run([task(*s) for s in segments])
    return out


def grouped_linear_backward(
    grad_out: torch.Tensor,
    rows: torch.Tensor,
    weight: torch.Tensor,
    dispatch: ExpertDispatch,
    need_rows: bool,
    need_weight: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``grouped_linear``: ``grad_out [M, N]`` → (``grad_rows [M, K]``, ``grad_weight [E, N, K]``).

    Per touched expert: ``grad_rows[e] = grad_out[e] @ weight[e]`` and ``grad_weight[e] =
    grad_out[e]ᵀ @ rows[e]``, both written in place by ``mm`` (MKL: oneDNN's backward primitives
    measured no faster). ``grad_weight`` starts uninitialised: touched slices are overwritten once,
    untouched ones zero-filled.
    """
    grad_rows = empty_hugepage(*rows.shape, like=grad_out) if need_rows else None
    grad_weight = empty_hugepage(*weight.shape, like=weight) if need_weight else None

    def task(e: int, start: int, stop: int) -> Callable[[], None]:
        def run() -> None:
            g = grad_out[start:stop]
            if grad_rows is not None:
                torch.mm(g, weight[e], out=grad_rows[start:stop])
            if grad_weight is not None:
                torch.mm(g.t(), rows[start:stop], out=grad_weight[e])

        return run

    tasks: list[Callable[[], object]] = [task(*s) for s in dispatch.segments]
    if grad_weight is not None:  # first-touch of fresh memory: spread over the threads as well
        tasks += [grad_weight[e].zero_ for e in dispatch.untouched]
    EXPERT_THREADS.run(tasks)
    return grad_rows, grad_weight


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the sums over a token's k slots in bf16/fp16 (rounded once at the end), else ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


class GroupedExperts(torch.autograd.Function):
    """SwiGLU experts on expert-sorted rows, with a backward that only touches routed experts.

    ``hidden [N, H]``, ``gate_up_proj [E, 2I, H]`` (gate rows first), ``down_proj [E, H, I]``,
    ``top_k_weights [N, k]`` → ``[N, H]``. Hand-written rather than autograd through the same ops:
    autograd would build weight gradients through full-size zero-filled ``[E, ...]`` buffers and
    scatter the input gradient with a serial ``index_put_(accumulate=True)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        top_k_weights: torch.Tensor,
        dispatch: ExpertDispatch,
    ) -> torch.Tensor:
        n, k = top_k_weights.shape
        rows = hidden.index_select(0, dispatch.sorted_token)  # [N·k, H], grouped by expert
        gate_up = grouped_linear(rows, gate_up_proj, dispatch.segments)  # [N·k, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up  # [N·k, I]
        down = grouped_linear(act, down_proj, dispatch.segments)  # [N·k, H]
        # Back to (token, slot) order, then Σ_slot w·row as one batched [1, k] @ [k, H] per token:
        # parallel and deterministic (no serial index_add), and in fp32 so bf16 rounds once.
        acc = accumulation_dtype(hidden.dtype)
        per_slot = down.index_select(0, dispatch.slot_row).view(n, k, down.shape[1]).to(acc)
        # NOTE: written into a tensor of its own, not returned as a squeeze() view of the product: a block that
        # adds to the experts' output in place (transformers 5.0's Qwen2-MoE, modeling_qwen2_moe.py:375) may
        # not modify a view created inside a custom autograd Function.
        out = torch.empty(n, down.shape[1], dtype=acc, device=hidden.device)
        torch.bmm(top_k_weights.to(acc).unsqueeze(1), per_slot, out=out.unsqueeze(1))
        out = out.to(hidden.dtype)
        ctx.dispatch = dispatch
        ctx.save_for_backward(rows, gate_up, act, per_slot, gate_up_proj, down_proj, top_k_weights)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, gate_up, act, per_slot, gate_up_proj, down_proj, top_k_weights = ctx.saved_tensors
        dispatch: ExpertDispatch = ctx.dispatch
        need_hidden, need_gate_up, need_down, need_weights = ctx.needs_input_grad[:4]
        n, k = top_k_weights.shape
        g = grad_out.to(per_slot.dtype)

        grad_weights = None
        if need_weights:  # d out[t] / d w[t, s] = ⟨grad_out[t], row (t, s)⟩
            grad_weights = torch.bmm(per_slot, g.unsqueeze(2)).squeeze(2).to(top_k_weights.dtype)
        if not (need_hidden or need_gate_up or need_down):
            return None, None, None, grad_weights, None

        # d out / d down, in sorted order: each row's token gradient times its routing weight.
        sorted_weight = top_k_weights.reshape(-1).index_select(0, dispatch.order).to(g.dtype)
        grad_down = (g.index_select(0, dispatch.sorted_token) * sorted_weight.unsqueeze(1)).to(act.dtype)
        need_act = need_hidden or need_gate_up
        grad_act, grad_down_proj = grouped_linear_backward(grad_down, act, down_proj, dispatch, need_act, need_down)
        if grad_act is None:
            return None, None, grad_down_proj, grad_weights, None

        gate, up = gate_up.chunk(2, dim=-1)
        # SwiGLU backward with the ops autograd would use (same rounding in bf16).
        grad_gate_up = torch.cat([torch.ops.aten.silu_backward(grad_act * up, gate), grad_act * F.silu(gate)], dim=-1)
        grad_rows, grad_gate_up_proj = grouped_linear_backward(
            grad_gate_up, rows, gate_up_proj, dispatch, need_hidden, need_gate_up
        )
        grad_hidden = None
        if grad_rows is not None:  # Σ over each token's k rows, gathered back to slot order (no serial scatter)
            per_slot_rows = grad_rows.index_select(0, dispatch.slot_row).view(n, k, grad_rows.shape[1])
            grad_hidden = per_slot_rows.sum(1, dtype=g.dtype).to(grad_out.dtype)
        return grad_hidden, grad_gate_up_proj, grad_down_proj, grad_weights, None


class TorchGroupedMMBackend(FusedExpertsBackend):
    devices = ("cpu", "cuda")
    dtypes = ("fp32", "bf16")

    def supports(self, entry: ArchEntry, dtype: str, device: str) -> str | None:
        if device == "cuda" and dtype != "bf16":
            return "torch._grouped_mm on CUDA takes bf16 only"
        return super().supports(entry, dtype, device)

    def experts_forward(self, gate_up_proj, down_proj, hidden, top_k_index, top_k_weights):  # type: ignore[no-untyped-def]
        if hidden.device.type == "cpu":
            dispatch = expert_dispatch(top_k_index, gate_up_proj.shape[0])
            return GroupedExperts.apply(hidden, gate_up_proj, down_proj, top_k_weights, dispatch)
        return grouped_mm_experts(gate_up_proj, down_proj, hidden, top_k_index, top_k_weights)


def grouped_mm_experts(
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The ``torch._grouped_mm`` path (CUDA, bf16), autograd for the backward.

    ``hidden [N, H]``, ``top_k_index/weights [N, k]``, ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``
    → ``[N, H]``. The ``transpose(1, 2)`` weight views cost nothing on CUDA: the kernel takes them as is.
    """
    n, k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # rows grouped by expert, ties in (token, slot) order
    counts = torch.bincount(flat, minlength=gate_up_proj.shape[0])
    offsets = torch.cumsum(counts, 0).to(torch.int32)  # grouped_mm takes cumulative row ends
    rows = hidden[order // k]
    gate, up = torch._grouped_mm(rows, gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    down = torch._grouped_mm(F.silu(gate) * up, down_proj.transpose(1, 2), offs=offsets)
    weights = top_k_weights.reshape(-1)[order].unsqueeze(-1)
    out = torch.zeros(n, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    # NOTE: accumulate in fp32 then cast once: a bf16 index_add would round at every slot.
    return out.index_add(0, order // k, down.float() * weights.float()).to(hidden.dtype)


GROUPED_MM = TorchGroupedMMBackend("grouped-mm")
