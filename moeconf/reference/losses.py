"""Reference router losses, computed from raw router logits.

NOTE: both losses take the *logits* (``x Wᵀ + b``), never probabilities: a router that records
probabilities as its "logits" makes the consumer apply softmax twice and the aux loss goes nearly
constant (transformers #45120; docs/regression-cases.md #5).
"""

from __future__ import annotations

import torch


def _row_weights(logits: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[N]`` weight per token row: 1, or the flattened ``[B, S]`` attention mask (0 = padding)."""
    if attention_mask is None:
        return torch.ones(logits.shape[0], dtype=logits.dtype, device=logits.device)
    return attention_mask.reshape(-1).to(logits.dtype)


def load_balancing_loss(
    logits: torch.Tensor, top_k: int, attention_mask: torch.Tensor | None = None, group_size: int | None = None
) -> torch.Tensor:
    """Switch/GShard load-balancing loss ``E · Σ_e f_e · P_e`` over non-padded tokens.

    ``group_size``: when given, the loss is taken over each group of that many consecutive rows (one
    sequence) and averaged over the groups that hold a non-padded row (Switch's per-sequence form).

    ``f_e`` = fraction of (token, slot) assignments to expert ``e`` when choosing the top-k of
    ``softmax(logits)`` (so Σ f = k and perfectly uniform routing gives ``k``); ``P_e`` = mean router
    probability of ``e``. Padded rows (mask 0) count in neither (transformers #28505;
    docs/regression-cases.md #6). Selection here is on the softmax of the logits even for sigmoid
    routers: transformers' ``load_balancing_loss_func`` softmaxes whatever the router records, and that
    is the loss the models train with (docs/router-families.md, 'Load-balancing (aux) loss').
    """
    if group_size is not None:
        return _mean_over_groups(logits, top_k, attention_mask, group_size)
    n, e = logits.shape
    rows = _row_weights(logits, attention_mask)
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.zeros_like(probs).scatter(1, probs.topk(top_k, dim=-1).indices, 1.0)
    total = rows.sum()
    fraction_routed = (chosen * rows[:, None]).sum(dim=0) / total
    mean_prob = (probs * rows[:, None]).sum(dim=0) / total
    return e * (fraction_routed * mean_prob).sum()


def _mean_over_groups(
    logits: torch.Tensor, top_k: int, attention_mask: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """The batch loss of each group of ``group_size`` rows ``[G·group_size, E]``, averaged over the
    groups with at least one non-padded row."""
    rows = _row_weights(logits, attention_mask)
    losses = [
        load_balancing_loss(logits[start : start + group_size], top_k, rows[start : start + group_size])
        for start in range(0, logits.shape[0], group_size)
        if rows[start : start + group_size].sum() > 0
    ]
    return torch.stack(losses).mean()


def aux_selection_margin(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """``[N]`` relative gap between the k-th and (k+1)-th softmax probability (ties would make the
    aux loss's own top-k ambiguous)."""
    probs = torch.softmax(logits.detach(), dim=-1)
    ranked = probs.sort(dim=-1, descending=True).values
    if top_k >= probs.shape[-1]:
        return torch.full_like(ranked[:, 0], float("inf"))
    spread = (ranked[:, 0] - ranked[:, -1]).clamp_min(1e-12)
    return (ranked[:, top_k - 1] - ranked[:, top_k]) / spread


def router_z_loss(logits: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over non-padded tokens of ``logsumexp(logits)²``."""
    rows = _row_weights(logits, attention_mask)
    return (torch.logsumexp(logits, dim=-1).square() * rows).sum() / rows.sum()
