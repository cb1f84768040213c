"""Reference token dispatch for grouped backends: permute → per-expert grouped matmul → unpermute.

These define what a grouped path (torch._grouped_mm, torch_npu grouped matmul, ...) must compute,
with the simplest possible code: a stable sort, a Python loop over experts, a scatter-add back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dispatch:
    """A stable sort of the ``N·k`` (token, slot) pairs by expert.

    Attributes:
        order: ``[N·k]`` forward map: row ``r`` of the permuted tensor holds flat slot ``order[r]``
            (flat slot = ``token·k + slot``).
        counts: ``[E]`` rows per expert, in expert order.
        top_k: slots per token.
    """

    order: torch.Tensor
    counts: torch.Tensor
    top_k: int

    @property
    def tokens(self) -> torch.Tensor:
        """``[N·k]`` source token of every permuted row."""
        return self.order // self.top_k


def make_dispatch(index: torch.Tensor, num_experts: int) -> Dispatch:
    """Stable sort of ``index [N, k]`` by expert (ties keep ascending flat slot)."""
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return Dispatch(order=order, counts=counts, top_k=index.shape[1])


def permute(x: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
    """``[N, H] → [N·k, H]``: one row per (token, slot), grouped by expert."""
    return x[dispatch.tokens]


def grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``rows [M, K]`` grouped by ``counts [E]`` times ``weight [E, N, K]`` (``nn.Linear`` layout) → ``[M, N]``.

    Groups with zero rows produce nothing (and so receive exactly zero gradient).
    """
    out = rows.new_zeros(rows.shape[0], weight.shape[1])
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out = out.index_copy(
                0, torch.arange(start, start + n, device=rows.device), rows[start : start + n] @ weight[e].T
            )
        start += n
    return out


def unpermute(rows: torch.Tensor, dispatch: Dispatch, weights: torch.Tensor) -> torch.Tensor:
    """``rows [N·k, H']`` back to tokens: ``out[t] = Σ_s weights[t, s] · rows[row of (t, s)]`` → ``[N, H']``."""
    n = weights.shape[0]
    flat_weights = weights.reshape(-1)[dispatch.order].unsqueeze(-1)
    return rows.new_zeros(n, rows.shape[1]).index_add(0, dispatch.tokens, flat_weights * rows)
