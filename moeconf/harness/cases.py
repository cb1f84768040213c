"""Inputs for the parity checks: seeded parameters and token batches with routing margins.

Parameters are drawn once per (architecture, seed); tokens are drawn from a larger pool and kept only
if the reference routes them with a comfortable margin (so rounding never decides a selection) and
if they satisfy the case's constraint (e.g. "no token reaches the last expert").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from moeconf.params import Params, param_shapes, round_through, token_set_params, token_set_spec, unqualified
from moeconf.reference import aux_selection_margin, route
from moeconf.reference.moe import activation
from moeconf.spec import ExpertSpec, MoESpec

Constraint = Literal["none", "avoid_last_expert", "all_use_first_expert"]

MIN_MARGIN = 0.05
"""Minimum routing margin, relative to the token's spread of selection scores.

NOTE: bf16 router logits carry ~2^-8 relative error; on the tiny shapes (logit std ≈ 2) that moves a
softmax probability by < 0.5 % of the spread, an order of magnitude below this margin.
"""


MARGIN_EXPERTS = 16
"""Up to this many routable classes the margin is ``MIN_MARGIN``; beyond, it shrinks as ``16 / (E + Z)``."""


BF16_MIN_MARGIN = 0.015
"""The least margin under bf16, whatever E: bf16 router logits (a sum of H rounded products) are off by up to
~1 % of the spread, which decided a 512-expert token's 10th choice at ``16 / 512`` of ``MIN_MARGIN``."""


def min_margin(spec: MoESpec, dtype: torch.dtype | None = None) -> float:
    """The routing margin a token needs under ``spec``, computed in ``dtype`` (None: as for fp32).

    NOTE: the gap between a token's k-th and (k+1)-th of E scores shrinks like 1/E: with 256 experts
    (DeepSeek-V3's published config) not one token in millions clears 0.05 of the spread. Scaled down
    beyond 16 experts (``16 / (E + Z)`` of it), with a floor under bf16 (``BF16_MIN_MARGIN``).
    """
    margin = MIN_MARGIN * min(1.0, MARGIN_EXPERTS / spec.router_width)
    return max(margin, BF16_MIN_MARGIN) if dtype == torch.bfloat16 and margin < MIN_MARGIN else margin


@dataclass(frozen=True)
class Case:
    """A named batch shape plus a routing constraint."""

    name: str
    batch: int
    seq: int
    constraint: Constraint
    description: str

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


CASES: tuple[Case, ...] = (
    Case("random", 2, 8, "none", "random tokens, random non-uniform routing weights, a padded row for the losses"),
    Case("single_token", 1, 1, "none", "T=1"),
    Case(
        "empty_expert", 2, 6, "avoid_last_expert", "the last expert receives no token (its grads must be exact zeros)"
    ),
    Case("one_expert", 1, 6, "all_use_first_expert", "every token is routed to expert 0"),
)
CASE_NAMES = tuple(c.name for c in CASES)


@dataclass(frozen=True)
class Inputs:
    """One case's inputs, float64, already rounded through the compute dtype.

    Attributes:
        params: canonical parameters (rounded through the compute dtype).
        hidden: ``[B, S, H]`` block input.
        attention_mask: ``[B, S]`` int64, zeros mark padding (only when ``B > 1``).
        grad_output: ``[B, S, H]`` cotangent for the backward pass.
        token_types: ``[B, S]`` int64 token-type ids choosing each token's expert set; only for a
            spec with ``token_sets`` (None otherwise).
    """

    params: Params
    hidden: torch.Tensor
    attention_mask: torch.Tensor
    grad_output: torch.Tensor
    token_types: torch.Tensor | None = None


def draw_params(spec: MoESpec, seed: int, selection_bias: tuple[float, float] | None = None) -> Params:
    """Seeded float64 canonical parameters with healthy scales.

    Router logits get a standard deviation of about 2 (clear winners, no saturation); expert weights
    are fan-in scaled so activations stay O(1); selection biases are large enough to change choices,
    or ``offset + scale · N(0, 1)`` when ``selection_bias = (offset, scale)`` (a trained state that
    dominates the scores: a config sample's, ``moeconf.strategies``).
    """
    gen = torch.Generator().manual_seed(seed)
    params: Params = {}
    for name, shape in param_shapes(spec).items():
        fan_in = shape[-1]
        if name.endswith("norm.weight"):
            params[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
            continue
        if name == "router.expert_scale":
            # Positive and near 1 as trained (Gemma 4 initialises ones): a scale near 0 or of mixed sign lets the
            # k weighted outputs cancel, and the routed output norm then divides by a vanishing RMS.
            params[name] = 1.0 + 0.2 * torch.randn(shape, generator=gen, dtype=torch.float64)
            continue
        base = unqualified(name)  # a token set's router/experts draw like set 0's
        if base == "router.weight":
            scale = 2.0 / math.sqrt(fan_in)
        elif base == "router.selection_bias" and selection_bias is not None:
            offset, spread = selection_bias
            params[name] = offset + spread * torch.randn(shape, generator=gen, dtype=torch.float64)
            continue
        elif base == "router.selection_bias":
            # Large enough to change some choices on the scale of what it is added to.
            scale = 0.5 if spec.router.select_on == "logits" else 0.05 if spec.router.scoring == "softmax" else 0.1
        elif name.split(".")[-1].startswith("b"):
            scale = 0.1
        else:
            scale = 1.0 / math.sqrt(fan_in)
        params[name] = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    return params


CLAMP_MARGIN = 0.02
"""Minimum distance of a clamped pre-activation from its limit, relative to the limit.

NOTE: a value that sits on a clamp's edge flips the clamp's gradient under bf16 rounding (seen with
L = 1.25: 1.2512 rounds to 1.25), which no tolerance can absorb; so tokens keep away from the edge.
"""


CLAMPED = ("gptoss_clamped", "clamped_swiglu", "clamped_after_act")


def _edge_distance(form: ExpertSpec, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[n]`` smallest distance of a clamped pre-activation from the limit, relative to the limit."""
    limit = form.gptoss_limit
    if form.glu == "clamped_after_act":
        gate = activation(form.activation, gate)
    near = torch.minimum((gate - limit).abs(), torch.minimum((up - limit).abs(), (up + limit).abs()))
    return near.min(dim=-1).values / limit


def _clamp_distance(spec: MoESpec, params: Params, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[N]`` smallest relative distance of any clamped pre-activation (selected experts, shared expert)
    from its limit; infinite where nothing is clamped."""
    nearest = torch.full((x.shape[0],), float("inf"), dtype=x.dtype)
    experts = spec.experts
    if experts.glu in CLAMPED:
        for e in range(spec.num_experts):
            rows = (index == e).any(dim=-1)
            if not rows.any():
                continue
            gate = x[rows] @ params["experts.w_gate"][e].T
            up = x[rows] @ params["experts.w_up"][e].T
            if experts.bias:
                gate, up = gate + params["experts.b_gate"][e], up + params["experts.b_up"][e]
            nearest[rows] = torch.minimum(nearest[rows], _edge_distance(experts, gate, up))
    if spec.shared is not None and spec.shared.form.glu in CLAMPED:
        shared = _edge_distance(spec.shared.form, x @ params["shared.w_gate"].T, x @ params["shared.w_up"].T)
        nearest = torch.minimum(nearest, shared)
    return nearest


def _satisfies(constraint: Constraint, index: torch.Tensor, num_experts: int) -> torch.Tensor:
    if constraint == "avoid_last_expert":
        return ~(index == num_experts - 1).any(dim=-1)
    if constraint == "all_use_first_expert":
        return (index == 0).any(dim=-1)
    return torch.ones(index.shape[0], dtype=torch.bool)


class CaseError(ValueError):
    """No token batch satisfying the case could be drawn (a spec/case mismatch)."""


CASE_SEED_STRIDE = 7919
"""Token streams are seeded ``seed * CASE_SEED_STRIDE + case salt``: a prime stride larger than any
salt, so no two (seed, case) pairs share a stream."""


def token_pool(hidden: int, size: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """``[size, hidden]`` float64 candidate tokens, already rounded through ``dtype``."""
    return torch.randn(size, hidden, generator=gen, dtype=torch.float64).to(dtype).to(torch.float64)


def select_tokens(
    spec: MoESpec,
    params: Params,
    candidates: torch.Tensor,
    count: int,
    keep: Callable[[torch.Tensor], torch.Tensor],
    what: str,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The first ``count`` candidates (``[N, H]``) that the reference routes with a margin, that keep
    clamped pre-activations away from their limits, and whose top-k index passes ``keep``.

    The one token filter of moeconf: every case (single-process and multi-rank) draws through it.
    Raises ``CaseError`` naming ``what`` when too few candidates qualify.
    """
    routing = route(spec, params, candidates)
    margin = routing.margin
    if spec.losses.aux != "none":
        margin = torch.minimum(margin, aux_selection_margin(routing.logits, spec.top_k))
    ok = (margin >= min_margin(spec, dtype)) & keep(routing.index)
    ok &= _clamp_distance(spec, params, candidates, routing.index) >= CLAMP_MARGIN
    chosen = ok.nonzero().flatten()[:count]
    if chosen.numel() < count:
        raise CaseError(f"{what}: only {chosen.numel()}/{count} of {len(candidates)} tokens satisfy it")
    return candidates[chosen]


def _pad_width(case: Case) -> int:
    """Left-padded positions of the first row (0: no padding)."""
    return case.seq // 2 if case.batch > 1 and case.seq > 2 else 0


def case_token_types(spec: MoESpec, case: Case) -> torch.Tensor | None:
    """``[B, S]`` token-type ids for a spec with token sets (None otherwise): every type id in turn,
    ``(b + s + 1) mod T``, so that every case of two or more tokens mixes the sets token by token and
    the single token is type 1 (its set 0 runs on no token at all). The padded run of the first row
    takes the type of its first position, as the pad tokens share its embedding."""
    if spec.token_sets is None:
        return None
    count = len(spec.token_sets.set_of_type)
    b, s = torch.meshgrid(torch.arange(case.batch), torch.arange(case.seq), indexing="ij")
    types = (b + s + 1) % count
    types[0, : _pad_width(case)] = types[0, 0]
    return types.to(torch.int64)


def _select_typed(
    spec: MoESpec,
    params: Params,
    candidates: torch.Tensor,
    types: torch.Tensor,
    keep: Callable[[torch.Tensor], torch.Tensor],
    what: str,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``[N, H]`` tokens for the positions whose type ids are ``types [N]`` (a spec with token sets):
    each set's positions get tokens that set's router routes with a margin (``select_tokens``), drawn
    from disjoint parts of the pool."""
    assert spec.token_sets is not None
    sets = torch.tensor(spec.token_sets.set_of_type)[types]
    tokens = candidates.new_zeros(len(types), candidates.shape[1])
    pools = candidates.chunk(spec.token_sets.num_sets)
    for s in range(spec.token_sets.num_sets):
        rows = (sets == s).nonzero().flatten()
        if rows.numel():
            sub = token_set_spec(spec, s)
            tokens[rows] = select_tokens(
                sub, token_set_params(params, s), pools[s], rows.numel(), keep, f"{what}, set {s}", dtype
            )
    return tokens


def make_inputs(
    spec: MoESpec,
    case: Case,
    dtype: torch.dtype,
    seed: int,
    pool: int = 4096,
    selection_bias: tuple[float, float] | None = None,
) -> Inputs:
    """Draw the case's inputs for ``spec`` in ``dtype``; deterministic in ``seed`` (``selection_bias``:
    ``draw_params``')."""
    params = round_through(draw_params(spec, seed, selection_bias), dtype)
    gen = torch.Generator().manual_seed(seed * CASE_SEED_STRIDE + sum(map(ord, case.name)))
    candidates = token_pool(spec.hidden, pool, dtype, gen)
    token_types = case_token_types(spec, case)

    def keep(index: torch.Tensor) -> torch.Tensor:
        return _satisfies(case.constraint, index, spec.num_experts)

    if token_types is None:
        tokens = select_tokens(spec, params, candidates, case.tokens, keep, f"case {case.name}", dtype)
    else:
        tokens = _select_typed(spec, params, candidates, token_types.reshape(-1), keep, f"case {case.name}", dtype)
    hidden = tokens.reshape(case.batch, case.seq, spec.hidden)
    mask = torch.ones(case.batch, case.seq, dtype=torch.int64)
    pad = _pad_width(case)
    if pad:
        # Left padding on the first row. Padding positions share one embedding, as pad tokens do, so
        # they all route alike and skew the statistics of any aux loss that forgets the mask.
        mask[0, :pad] = 0
        hidden[0, :pad] = hidden[0, 0]
    grad_output = torch.randn(hidden.shape, generator=gen, dtype=torch.float64).to(dtype).to(torch.float64)
    return Inputs(params=params, hidden=hidden, attention_mask=mask, grad_output=grad_output, token_types=token_types)
