"""Reference routing: logits → scores → (group-limited) top-k selection → weights.

Pure float64 torch, written to read like the formulas in docs/router-families.md ('Pipeline').
Nothing here imports transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeconf.params import Params, token_set_params, token_set_spec
from moeconf.spec import Capacity, GroupLimit, MoESpec, RouterSpec


@dataclass(frozen=True)
class Routing:
    """What a router decides for ``N`` tokens.

    Attributes:
        logits: ``[N, E]`` raw router logits ``x Wᵀ (+ b)``.
        index: ``[N, k]`` selected experts, ascending per token (sets, not order, are the contract).
        weights: ``[N, k]`` routing weights aligned with ``index``; differentiable. A slot that capacity
            dropped weighs 0 (its weight is applied to nothing), except under ``Capacity.dropped=
            "passthrough"``, where a token with every slot dropped leaves the block at its weight × x.
        margin: ``[N]`` gap between the last selected and the first rejected candidate, relative to
            the token's score spread (SparseMixer: or, if smaller, the distance of a mask decision
            from its threshold). Cases keep tokens with a comfortable margin so that rounding never
            decides a selection.
        kept: ``[N, k]`` bool; False where capacity dropped the slot (all True without capacity).
        shared_weights: ``[N, n]`` weights of the ``n`` shared-expert router slots
            (``RouterSpec.shared_slots``, Inkling), renormalised and scaled with ``weights``; None without.
            ``logits`` then holds the ``E + Z`` selectable classes only, as the model records them.
    """

    logits: torch.Tensor
    index: torch.Tensor
    weights: torch.Tensor
    margin: torch.Tensor
    kept: torch.Tensor
    shared_weights: torch.Tensor | None = None


def router_logits(spec: MoESpec, params: Params, x: torch.Tensor) -> torch.Tensor:
    """``[N, H] → [N, E + Z + n]`` (``n`` shared slots): ``x Wᵀ (+ b)``, scaled by ``logit_multiplier`` and soft-capped."""
    router = spec.router
    if router.input_norm_eps is not None:  # Gemma 4: the router reads its own RMS-normalised, rescaled input
        x = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + router.input_norm_eps)
        x = x * params["router.input_norm.weight"]
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


def _apply_capacity(ranked: torch.Tensor, capacity: Capacity, group_size: int) -> torch.Tensor:
    """``kept [N, k]`` for the picks ``ranked [N, k]`` (best first): within each group of ``group_size``
    consecutive tokens, each expert keeps its first ``capacity`` assignments in the ``capacity.order``
    priority (token by token, or all first picks before any second pick)."""
    n, k = ranked.shape
    kept = torch.ones_like(ranked, dtype=torch.bool)
    for start in range(0, n, group_size):
        tokens = range(start, min(start + group_size, n))
        if capacity.order == "token":
            slots = [(t, s) for t in tokens for s in range(k)]
        else:
            slots = [(t, s) for s in range(k) for t in tokens]
        used: dict[int, int] = {}
        for t, s in slots:
            e = int(ranked[t, s])
            used[e] = used.get(e, 0) + 1
            kept[t, s] = used[e] <= capacity.capacity
    return kept


def _renorm_kept(weights: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``[N, k]`` weights divided by their sum over the kept slots; dropped slots weigh 0.

    NOTE: clamped rather than masked with ``where``: a token with every slot dropped then gets 0 / tiny = 0
    with a zero gradient (as fairseq's ``clamp(min=eps)``), never 0 / 0 in the backward.
    """
    weights = weights * kept
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


def sparsemixer_weights(logits: torch.Tensor, ranked: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseMixer weights (PhiMoE, eval mode) of the picks ``ranked [N, k]`` (best first) → ``[N, k]``,
    and the ``[N]`` smallest distance of a mask decision from its threshold.

    Pick ``j`` with logit ``m_j`` gets ``softmax(ℓ')[pick j]``: ``ℓ'`` is ℓ with the earlier picks at −inf
    and every logit with ``r_i = (m_j − ℓ_i) / max(|ℓ_i|, m_j) > 2ε`` at −inf (a relative distance from
    the pick). The mask is a selection (no gradient); the weights are differentiable in the kept logits.
    The distance ``|r_i − 2ε|`` over the candidates still in play keeps rounding from flipping a mask.
    """
    threshold = 2 * eps
    remaining, detached = logits, logits.detach()
    weights, margin = [], torch.full_like(detached[:, 0], float("inf"))
    in_play = torch.ones_like(detached, dtype=torch.bool)
    for j in range(ranked.shape[1]):
        pick = ranked[:, j : j + 1]
        top = detached.gather(1, pick)
        relative = (top - detached) / detached.abs().clamp(min=top)
        kept = remaining.masked_fill(relative > threshold, float("-inf"))
        weights.append(torch.softmax(kept, dim=-1).gather(1, pick))
        # NOTE: the pick itself sits at r = 0 and is never masked; only the others' mask can flip.
        others = in_play.scatter(1, pick, False)
        distance = (relative - threshold).abs().masked_fill(~others, float("inf"))
        margin = torch.minimum(margin, distance.min(dim=-1).values)
        in_play = others
        remaining = remaining.masked_fill(~in_play, float("-inf"))
    return torch.cat(weights, dim=-1), margin


def route(spec: MoESpec, params: Params, x: torch.Tensor, tokens_per_sequence: int | None = None) -> Routing:
    """Route ``x [N, H]``: the reference for ``routing`` and ``routing_weights``."""
    router, k = spec.router, spec.top_k
    logits = router_logits(spec, params, x)
    # Shared-expert slots (Inkling): the last rows are scored, never selected; the candidates come first.
    logits, shared_logits = logits.split([spec.router_width, router.shared_slots], dim=-1)
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
    ranked, gap = _topk_with_margin(choice, k)
    index, order = torch.sort(ranked, dim=-1)

    # Weights: gathered (unbiased) scores, a softmax / sigmoid over the k selected logits, or SparseMixer's
    # masked softmax per pick (computed in rank order, then aligned with the sorted index).
    mask_gap = torch.full_like(spread, float("inf"))
    if router.weight_from == "sparsemixer":
        ranked_weights, mask_gap = sparsemixer_weights(logits, ranked, router.sparsemixer_eps)
        weights = ranked_weights.gather(1, order)
    elif router.weight_from == "scores":
        weights = scores.gather(1, index)
    elif router.weight_from == "softmax_of_selected_logits":
        weights = torch.softmax(logits.gather(1, index), dim=-1)
    else:
        weights = torch.sigmoid(logits.gather(1, index))
    if router.shared_slots:
        # The shared slots' scores join the k picked ones: one renormalisation and scaling for all k + n.
        weights = torch.cat([weights, _scores(router, shared_logits)], dim=-1)

    if router.renorm == "always":
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights / (total.clamp_min(router.renorm_eps) if router.renorm_clamp else total + router.renorm_eps)
    elif router.renorm == "pnorm":
        weights = weights / torch.linalg.vector_norm(weights, ord=router.renorm_p, dim=-1, keepdim=True)
    if router.expert_scale:
        # Gemma 4: each picked slot times its expert's learned scale, after the renormalisation (so the
        # weights no longer sum to 1); shared slots, if any, are not experts and keep theirs.
        weights = torch.cat([weights[:, :k] * params["router.expert_scale"][index], weights[:, k:]], dim=-1)

    # Capacity: drops decided in rank order (the priority may depend on it), then aligned with ``index``.
    kept = torch.ones_like(index, dtype=torch.bool)
    capacity = router.capacity
    if capacity is not None:
        group = tokens_per_sequence if capacity.group == "sequence" and tokens_per_sequence else x.shape[0]
        kept = _apply_capacity(ranked, capacity, group).gather(1, order)
        if capacity.renorm_kept:
            weights = _renorm_kept(weights, kept)
        elif capacity.dropped == "zero":
            # A dropped slot weighs 0: its weight reaches nothing, and a router that returns combine
            # weights (NLLB, normalize_router_prob_before_dropping=True) has already masked it there.
            weights = weights * kept
    if router.scaling_site == "weights":
        weights = weights * router.routed_scaling
    if router.learned_scale:
        weights = weights * params["router.scale"]
    weights, shared_weights = weights.split([k, router.shared_slots], dim=-1)
    # NOTE: the mask distance is already relative (to the logits' magnitude), like gap / spread.
    margin = torch.minimum(torch.minimum(gap / spread, group_gap / spread), mask_gap)
    return Routing(
        logits=logits,
        index=index,
        weights=weights,
        margin=margin,
        kept=kept,
        shared_weights=shared_weights if router.shared_slots else None,
    )


def token_sets_of(spec: MoESpec, token_types: torch.Tensor | None, n: int) -> torch.Tensor:
    """``[N]`` token set of each token: ``set_of_type`` of its type id; all set 0 without type ids."""
    if spec.token_sets is None or token_types is None:
        return torch.zeros(n, dtype=torch.long)
    lookup = torch.tensor(spec.token_sets.set_of_type, dtype=torch.long)
    return lookup[token_types.reshape(-1).long().cpu()]


def route_tokens(
    spec: MoESpec,
    params: Params,
    x: torch.Tensor,
    token_types: torch.Tensor | None = None,
    tokens_per_sequence: int | None = None,
) -> Routing:
    """Route ``x [N, H]`` whose token ``n`` has type id ``token_types[n]`` (any shape with ``N``
    elements): each token by its own set's router (``spec.token_sets``), the results put back at the
    tokens' positions. Without token sets this is ``route``."""
    if spec.token_sets is None:
        return route(spec, params, x, tokens_per_sequence)
    sets = token_sets_of(spec, token_types, x.shape[0]).to(x.device)
    n, k = x.shape[0], spec.top_k
    logits = x.new_zeros(n, spec.router_width)
    index = torch.zeros(n, k, dtype=torch.long, device=x.device)
    weights = x.new_zeros(n, k)
    margin = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    kept = torch.ones(n, k, dtype=torch.bool, device=x.device)
    for s in range(spec.token_sets.num_sets):
        rows = (sets == s).nonzero().flatten()
        if rows.numel() == 0:
            continue
        part = route(token_set_spec(spec, s), token_set_params(params, s), x[rows])
        # NOTE: out-of-place index_put keeps the logits and weights differentiable in each set's router.
        logits = logits.index_put((rows,), part.logits)
        weights = weights.index_put((rows,), part.weights)
        index[rows], margin[rows], kept[rows] = part.index, part.margin.detach(), part.kept
    return Routing(logits=logits, index=index, weights=weights, margin=margin, kept=kept)
