"""Reference routing: logits → scores → (group-limited) top-k selection → weights.

Pure float64 torch, written to read like the formulas in docs/router-families.md ('Pipeline').
Nothing here imports transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeconf.params import Params
from moeconf.spec import Capacity, GroupLimit, MoESpec, RouterSpec


@dataclass(frozen=True)
class Routing:
    """What a router decides for ``N`` tokens.

    Attributes:
        logits: ``[N, E]`` raw router logits ``x Wᵀ (+ b)``.
        index: ``[N, k]`` selected experts, ascending per token (sets, not order, are the contract).
        weights: ``[N, k]`` routing weights aligned with ``index``; differentiable.
        margin: ``[N]`` gap between the last selected and the first rejected candidate, relative to
            the token's score spread. Cases keep tokens with a comfortable margin so that rounding
            never decides a selection.
        kept: ``[N, k]`` bool; False where capacity dropped the slot (all True without capacity).
    """

    logits: torch.Tensor
    index: torch.Tensor
    weights: torch.Tensor
    margin: torch.Tensor
    kept: torch.Tensor


def router_logits(spec: MoESpec, params: Params, x: torch.Tensor) -> torch.Tensor:
    """``[N, H] → [N, E + Z]``: ``x Wᵀ (+ b)``, scaled by ``logit_multiplier`` and soft-capped."""
    router = spec.router
    logits = F.linear(x, params["router.weight"], params.get("router.bias") if router.logit_bias else None)
    logits = logits * router.logit_multiplier
    if router.logit_softcap is not None:
        logits = router.logit_softcap * torch.tanh(logits / router.logit_softcap)
    return logits


def _scores(router: RouterSpec, logits: torch.Tensor) -> torch.Tensor:
    if router.scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    if router.scoring == "sqrtsoftplus":
        return torch.sqrt(F.softplus(logits))
    return torch.sigmoid(logits)


def _topk_with_margin(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k indices of ``values [N, C]`` and the gap between the k-th and (k+1)-th value."""
    ranked, order = torch.sort(values, dim=-1, descending=True, stable=True)
    if k < values.shape[-1]:
        gap = ranked[:, k - 1] - ranked[:, k]
    else:
        gap = torch.full_like(ranked[:, 0], float("inf"))
    return order[:, :k], gap


def _group_mask(choice: torch.Tensor, group: GroupLimit) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``[N, E]`` mask of experts in the ``topk_group`` best groups, and the group-stage gap."""
    n, e = choice.shape
    grouped = choice.view(n, group.n_group, e // group.n_group)
    if group.score == "top2sum":
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    keep_groups, gap = _topk_with_margin(group_scores, group.topk_group)
    mask = torch.zeros(n, group.n_group, dtype=torch.bool, device=choice.device)
    mask.scatter_(1, keep_groups, True)
    return mask.repeat_interleave(e // group.n_group, dim=1), gap


def _apply_capacity(index: torch.Tensor, capacity: Capacity, tokens_per_sequence: int) -> torch.Tensor:
    """``kept [N, k]``: per sequence, in token-then-slot order, each expert keeps ``capacity`` slots."""
    n, k = index.shape
    kept = torch.ones_like(index, dtype=torch.bool)
    for start in range(0, n, tokens_per_sequence):
        used: dict[int, int] = {}
        for t in range(start, min(start + tokens_per_sequence, n)):
            for s in range(k):
                e = int(index[t, s])
                used[e] = used.get(e, 0) + 1
                kept[t, s] = used[e] <= capacity.capacity
    return kept


def route(spec: MoESpec, params: Params, x: torch.Tensor, tokens_per_sequence: int | None = None) -> Routing:
    """Route ``x [N, H]``: the reference for ``routing`` and ``routing_weights``."""
    router, k = spec.router, spec.top_k
    logits = router_logits(spec, params, x)
    scores = _scores(router, logits)

    # Selection: what top-k ranks, plus a bias that steers the choice but never enters the weights.
    choice = scores if router.select_on == "scores" else logits
    if router.selection_bias:
        choice = choice + params["router.selection_bias"]
    choice = choice.detach()
    spread = (choice.max(dim=-1).values - choice.min(dim=-1).values).clamp_min(1e-12)
    group_gap = torch.full_like(spread, float("inf"))
    if router.group_limit is not None:
        in_group, group_gap = _group_mask(choice, router.group_limit)
        fill = float("-inf") if router.group_limit.fill == "-inf" else 0.0
        choice = choice.masked_fill(~in_group, fill)
    index, gap = _topk_with_margin(choice, k)
    index, _ = torch.sort(index, dim=-1)

    # Weights: gathered (unbiased) scores, or a softmax / sigmoid over the k selected logits.
    if router.weight_from == "scores":
        weights = scores.gather(1, index)
    elif router.weight_from == "softmax_of_selected_logits":
        weights = torch.softmax(logits.gather(1, index), dim=-1)
    else:
        weights = torch.sigmoid(logits.gather(1, index))

    if router.renorm == "always":
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights / (total.clamp_min(router.renorm_eps) if router.renorm_clamp else total + router.renorm_eps)
    elif router.renorm == "pnorm":
        weights = weights / torch.linalg.vector_norm(weights, ord=router.renorm_p, dim=-1, keepdim=True)
    if router.scaling_site == "weights":
        weights = weights * router.routed_scaling

    kept = torch.ones_like(index, dtype=torch.bool)
    if router.capacity is not None:
        kept = _apply_capacity(index, router.capacity, tokens_per_sequence or x.shape[0])
    margin = torch.minimum(gap / spread, group_gap / spread)
    return Routing(logits=logits, index=index, weights=weights, margin=margin, kept=kept)
