"""Routing distributions imposed on the experts call.

``natural`` is the block's own router on random inputs (nothing imposed). The others fix how many of the
``N·k`` (token, slot) assignments each expert receives, then lay them out so that no token picks an
expert twice:

- ``uniform``: every expert gets ``N·k/E`` (±1);
- ``zipf``: expert popularity ``∝ rank^-s`` with ``s = 1.2`` (ranks shuffled over the experts);
- ``hot``: one expert is in half of the tokens' top-k (``ceil(N/2)`` tokens), the rest share the others
  evenly;
- ``sparse``: a quarter of the experts get no token, the rest share evenly.

Loads are apportioned exactly (largest remainder, at most ``N`` per expert: a token cannot pick an expert
twice), so the realised histogram *is* the requested one up to rounding; ``expert_loads`` is what a test
compares ``bincount(index)`` with.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Routing = Literal["natural", "uniform", "zipf", "hot", "sparse"]
ROUTINGS: tuple[Routing, ...] = ("natural", "uniform", "zipf", "hot", "sparse")
IMPOSED: tuple[Routing, ...] = ("uniform", "zipf", "hot", "sparse")
ZIPF_S = 1.2
SPARSE_IDLE_FRACTION = 4
"""``sparse``: ``E // 4`` experts idle."""


class RoutingError(ValueError):
    """The distribution cannot be laid out for these sizes (e.g. ``sparse`` with k > 3E/4)."""


def apportion(total: int, shares: torch.Tensor, cap: int, generator: torch.Generator) -> torch.Tensor:
    """Split ``total`` items over ``len(shares)`` bins in proportion to ``shares`` (largest remainder,
    random tie-break), no bin above ``cap``; what a capped bin cannot take goes to the others.

    Returns ``[E]`` int64 counts summing to ``total``.
    """
    shares = shares.double()
    if total > cap * int((shares > 0).sum()):
        raise RoutingError(f"{total} assignments do not fit {int((shares > 0).sum())} experts of at most {cap}")
    counts = torch.zeros(len(shares), dtype=torch.int64)
    open_bins = shares > 0
    remaining = total
    while remaining > 0:
        weights = torch.where(open_bins, shares, torch.zeros_like(shares))
        quota = remaining * weights / weights.sum()
        base = quota.floor().long()
        leftover = remaining - int(base.sum())
        # NOTE: the random jitter only breaks exact ties (uniform shares), never reorders real remainders.
        remainder = (quota - base) + torch.rand(len(shares), generator=generator, dtype=torch.float64) * 1e-9
        remainder[~open_bins] = -1.0
        if leftover:
            base[remainder.topk(leftover).indices] += 1
        counts += base
        excess = (counts - cap).clamp(min=0)
        counts -= excess
        open_bins &= counts < cap
        remaining = int(excess.sum())
    return counts


def expert_shares(routing: Routing, num_experts: int, generator: torch.Generator) -> torch.Tensor:
    """The requested share of assignments per expert, ``[E]`` summing to 1 (``hot`` is given by
    ``expert_loads`` directly: its hot expert's load is a token count, not a share)."""
    if routing == "uniform":
        return torch.full((num_experts,), 1.0 / num_experts, dtype=torch.float64)
    if routing == "zipf":
        ranks = torch.randperm(num_experts, generator=generator).double() + 1
        weights = ranks.pow(-ZIPF_S)
        return weights / weights.sum()
    if routing == "sparse":
        idle = torch.randperm(num_experts, generator=generator)[: num_experts // SPARSE_IDLE_FRACTION]
        weights = torch.ones(num_experts, dtype=torch.float64)
        weights[idle] = 0.0
        return weights / weights.sum()
    raise ValueError(f"no share vector for routing {routing!r}")


def expert_loads(routing: Routing, tokens: int, num_experts: int, top_k: int, seed: int = 0) -> torch.Tensor:
    """Assignments per expert ``[E]`` (int64, summing to ``tokens·top_k``, each ≤ ``tokens``)."""
    generator = torch.Generator().manual_seed(seed)
    total = tokens * top_k
    if routing == "hot":
        hot = int(torch.randint(num_experts, (1,), generator=generator))
        hot_load = math.ceil(tokens / 2)
        others = torch.full((num_experts,), 1.0, dtype=torch.float64)
        others[hot] = 0.0
        loads = apportion(total - hot_load, others, tokens, generator)
        loads[hot] = hot_load
        return loads
    return apportion(total, expert_shares(routing, num_experts, generator), tokens, generator)


def index_from_loads(loads: torch.Tensor, tokens: int, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """``[N, k]`` int64 expert ids where expert ``e`` appears exactly ``loads[e]`` times, never twice in
    a row.

    The experts, repeated by load, are written column by column (slot ``j`` of token ``t`` takes entry
    ``j·N + t``): a run of one expert is at most ``N`` long, so it lands on distinct tokens. Tokens and
    slots are then shuffled so that no position is special.
    """
    experts = torch.repeat_interleave(torch.arange(len(loads)), loads)
    index = experts.reshape(top_k, tokens).T
    index = index[torch.randperm(tokens, generator=generator)]
    slot_order = torch.rand(tokens, top_k, generator=generator).argsort(dim=1)
    return index.gather(1, slot_order).contiguous()


def imposed_routing(
    routing: Routing,
    tokens: int,
    num_experts: int,
    top_k: int,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top_k_index [N, k] int64, top_k_weights [N, k])`` with the requested expert loads; weights are a
    softmax over each token's k slots (positive, summing to 1)."""
    generator = torch.Generator().manual_seed(seed)
    loads = expert_loads(routing, tokens, num_experts, top_k, seed)
    index = index_from_loads(loads, tokens, top_k, generator)
    weights = torch.randn(tokens, top_k, generator=generator).softmax(dim=-1)
    return index.to(device), weights.to(device=device, dtype=dtype)
