"""Inkling's router-gated shared experts and the Dots3-Note vision MoE: the reference formulas on hand-checked
values, and proof that each new feature can fail (seeded bugs turn the intended check red; the real blocks
pass).

The seeded backends below plug in as an outsider's would (``--backend tests.test_gated_shared_family:NAME``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moeconf.backends import HFBlockBackend
from moeconf.harness.cases import draw_params
from moeconf.hf.block import build_block, load_params, recording
from moeconf.params import param_shapes
from moeconf.reference import reference_forward, route
from moeconf.reference.moe import gated_mlp
from moeconf.registry import REGISTRY, ArchEntry
from moeconf.spec import MoESpec, RouterSpec, SharedSpec
from tests.records import assert_caught, records_of, red

# --- the reference ---------------------------------------------------------------------------------


def gated_spec(route_scale: float = 2.0) -> MoESpec:
    """E = 4, k = 2, two shared slots, hidden 6 (the identity router reads the first 6 dims as logits)."""
    router = RouterSpec(
        scoring="sigmoid",
        selection_bias=True,
        renorm="always",
        routed_scaling=route_scale,
        shared_slots=2,
        learned_scale=True,
    )
    return MoESpec(4, 2, 6, 3, router=router, shared=SharedSpec(3, gate="router"))


def identity_router(spec: MoESpec, scale: float) -> dict[str, torch.Tensor]:
    return {
        "router.weight": torch.eye(spec.router_rows, spec.hidden, dtype=torch.float64),
        "router.selection_bias": torch.zeros(spec.router_width, dtype=torch.float64),
        "router.scale": torch.tensor([scale], dtype=torch.float64),
    }


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_shared_slots_join_the_normaliser_on_a_hand_checked_token() -> None:
    """Routed ℓ = [2, 0, −1, 1], shared ℓ = [0.5, −0.5]: picks {0, 3} (σ = 0.881, 0.731); the k + n = 4 slots
    share one denominator Σσ = σ(2) + σ(1) + σ(0.5) + σ(−0.5) = 2.612, then × route_scale 2 × scale 0.5."""
    spec = gated_spec()
    routing = route(
        spec, identity_router(spec, 0.5), torch.tensor([[2.0, 0.0, -1.0, 1.0, 0.5, -0.5]], dtype=torch.float64)
    )
    assert routing.index.tolist() == [[0, 3]]
    total = sigmoid(2) + sigmoid(1) + sigmoid(0.5) + sigmoid(-0.5)
    assert torch.allclose(
        routing.weights, torch.tensor([[sigmoid(2) / total, sigmoid(1) / total]], dtype=torch.float64)
    )
    assert routing.shared_weights is not None
    assert torch.allclose(
        routing.shared_weights, torch.tensor([[sigmoid(0.5) / total, sigmoid(-0.5) / total]], dtype=torch.float64)
    )
    # The logits are the selectable classes only, as InklingTopkRouter returns (and the model records) them.
    assert routing.logits.shape == (1, 4)


def test_weights_equal_upstreams_softmax_of_logsigmoids() -> None:
    """softmax(logσ([ℓ_picked, ℓ_shared])) · route_scale · global_scale (modeling_inkling.py:359-365) is the
    sigmoid renormalisation the spec states."""
    spec = gated_spec(route_scale=3.0)
    x = torch.randn(16, spec.hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    routing = route(spec, identity_router(spec, -0.7), x)
    picked = x[:, :4].gather(1, routing.index)
    upstream = torch.softmax(F.logsigmoid(torch.cat([picked, x[:, 4:6]], dim=-1)), dim=-1) * 3.0 * -0.7
    assert torch.allclose(torch.cat([routing.weights, routing.shared_weights], dim=-1), upstream)  # type: ignore[list-item]


def test_router_gated_shared_experts_are_each_weighted_by_their_slot() -> None:
    """Output − routed part = Σ_j γ_j · MLP_j(x), with γ the shared slots' weights."""
    spec = gated_spec()
    params = draw_params(spec, 0)
    x = torch.randn(1, 5, spec.hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = reference_forward(spec, params, x)
    # Zero shared down projections leave the routed part alone (the routing does not read them).
    without_shared = reference_forward(
        spec, {**params, "shared.w_down": torch.zeros_like(params["shared.w_down"])}, x
    ).output
    flat = x.reshape(5, spec.hidden)
    gammas = route(spec, params, flat).shared_weights
    assert gammas is not None
    expected = sum(
        gammas[:, j : j + 1]
        * F.linear(
            gated_mlp(spec.shared.form, lambda name, j=j: F.linear(flat, params[f"shared.w_{name}"][j])),  # type: ignore[union-attr]
            params["shared.w_down"][j],
        )
        for j in range(2)
    )
    assert torch.allclose((result.output - without_shared).reshape(5, spec.hidden), expected)


def test_learned_scale_multiplies_every_weight_and_is_trained() -> None:
    spec = gated_spec()
    params = draw_params(spec, 0)
    x = torch.randn(8, spec.hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    one = route(spec, {**params, "router.scale": torch.ones(1, dtype=torch.float64)}, x)
    scale = params["router.scale"].clone().requires_grad_(True)
    scaled = route(spec, {**params, "router.scale": scale}, x)
    assert torch.allclose(scaled.weights, one.weights * scale.detach())
    assert torch.allclose(scaled.shared_weights, one.shared_weights * scale.detach())  # type: ignore[operator]
    (grad,) = torch.autograd.grad(scaled.weights.sum() + scaled.shared_weights.sum(), scale)  # type: ignore[union-attr]
    assert float(grad.abs()) > 0


def test_shared_slot_shapes() -> None:
    """Router rows E + n (weight), selection bias over the E selectable classes, stacked shared experts."""
    shapes = param_shapes(gated_spec())
    assert shapes["router.weight"] == (6, 6)
    assert shapes["router.selection_bias"] == (4,)
    assert shapes["router.scale"] == (1,)
    assert shapes["shared.w_gate"] == shapes["shared.w_up"] == (2, 3, 6)
    assert shapes["shared.w_down"] == (2, 6, 3)


def test_spec_refuses_shared_slots_without_router_gated_shared_experts() -> None:
    with pytest.raises(ValueError, match="shared_slots"):
        MoESpec(4, 2, 6, 3, router=RouterSpec(scoring="sigmoid", shared_slots=2), shared=SharedSpec(3))
    with pytest.raises(ValueError, match="shared_slots"):
        MoESpec(4, 2, 6, 3, router=RouterSpec(scoring="sigmoid"), shared=SharedSpec(3, gate="router"))
    with pytest.raises(ValueError, match="shared_slots"):  # a softmax over which classes?
        MoESpec(4, 2, 6, 3, router=RouterSpec(scoring="softmax", shared_slots=1), shared=SharedSpec(3, gate="router"))


# --- upstream facts ----------------------------------------------------------------------------------


def _inkling_block(**config: Any) -> tuple[ArchEntry, nn.Module]:
    base = REGISTRY["inkling_text"]
    entry = dataclasses.replace(base, config_kwargs={**base.config_kwargs, **config})
    block = build_block(entry, "eager")
    load_params(entry, block, draw_params(entry.spec, 0))
    return entry, block


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="upstream: InklingTextConfig.shared_expert_sink (transformers 5.24 models/inkling/configuration_inkling.py:57-59, "
    ":141) is never read: InklingTopkRouter.forward always puts the shared slots in the softmax (modeling_inkling.py:359-363)",
)
def test_inkling_shared_expert_sink_flag_changes_the_routing() -> None:
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    _, sink = _inkling_block(shared_expert_sink=True)
    _, no_sink = _inkling_block(shared_expert_sink=False)
    with torch.no_grad():
        assert not torch.equal(sink.gate(x)[1], no_sink.gate(x)[1])


@pytest.mark.xfail(
    strict=True,
    raises=RuntimeError,
    reason="upstream: with n_shared_experts=0, scores[..., : -self.n_shared_experts] is scores[..., :0], empty "
    "(transformers 5.24 models/inkling/modeling_inkling.py:355, :359), so the selection bias cannot be added",
)
def test_inkling_block_runs_without_shared_experts() -> None:
    base = REGISTRY["inkling_text"]
    block = build_block(dataclasses.replace(base, config_kwargs={**base.config_kwargs, "n_shared_experts": 0}))
    with torch.no_grad():
        block(torch.randn(1, 3, 32))


def test_inkling_records_only_the_routed_logits() -> None:
    """OutputRecorder(InklingTopkRouter, index=0) collects [N, E]: the shared slots stay out of any loss."""
    entry, block = _inkling_block()
    with torch.no_grad(), recording(entry, block) as rec:
        block(torch.randn(1, 5, entry.spec.hidden))
    logits = rec.router_logits(entry)
    assert logits is not None and logits.shape == (5, entry.spec.num_experts)


# --- seeded bugs -------------------------------------------------------------------------------------


def _replace_router_output(block: nn.Module, entry: ArchEntry, fn: Any) -> None:
    """``fn(router, hidden, *router_output)`` replaces the router's output."""
    block.get_submodule(entry.router_path).register_forward_hook(lambda m, args, out: fn(m, args[0], *out))


def _shared_outside_normaliser(block: nn.Module, entry: ArchEntry) -> None:
    """A DeepSeek-V3 router reused for Inkling: the k picked weights renormalised among themselves, each shared
    expert gated by its own sigmoid (no sink)."""
    e = entry.spec.num_experts

    def buggy(
        gate: nn.Module,
        hidden: torch.Tensor,
        logits: torch.Tensor,
        weights: torch.Tensor,
        index: torch.Tensor,
        gammas: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        scores = F.linear(hidden.reshape(-1, hidden.shape[-1]).float(), gate.weight.float()).sigmoid()
        picked = scores[:, :e].gather(1, index)
        scale = gate.route_scale * gate.global_scale.float()
        routed = picked / picked.sum(dim=-1, keepdim=True) * scale
        return logits, routed.to(weights.dtype), index, (scores[:, e:] * scale).to(gammas.dtype)

    _replace_router_output(block, entry, buggy)


shared_outside_normaliser = HFBlockBackend("shared-outside-normaliser", patch=_shared_outside_normaliser)


def _shared_gammas_swapped(block: nn.Module, entry: ArchEntry) -> None:
    """Shared expert ``j`` gated by slot ``n − 1 − j`` (a tensor-parallel shard order applied to one side only)."""

    def buggy(_gate: nn.Module, _hidden: torch.Tensor, *out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, weights, index, gammas = out
        return logits, weights, index, gammas.flip(-1)

    _replace_router_output(block, entry, buggy)


shared_gammas_swapped = HFBlockBackend("shared-gammas-swapped", patch=_shared_gammas_swapped)


def _global_scale_untrained(block: nn.Module, entry: ArchEntry) -> None:
    """A fused router kernel taking ``global_scale.item()``: the same weights, but no gradient reaches the scale."""

    def buggy(gate: nn.Module, _hidden: torch.Tensor, *out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, weights, index, gammas = out
        scale = gate.global_scale
        constant = (scale.detach() / scale).to(weights.dtype)  # value 1; cancels the weights' ∂/∂scale
        return logits, weights * constant, index, gammas * constant

    _replace_router_output(block, entry, buggy)


global_scale_untrained = HFBlockBackend("global-scale-untrained", patch=_global_scale_untrained)


def _vision_bias_in_weights(block: nn.Module, entry: ArchEntry) -> None:
    """Dots3-Note vision router weighting with the *biased* scores (the bias should only steer the choice)."""
    bias = block.get_buffer("e_score_correction_bias")
    scaling = entry.spec.router.routed_scaling

    def buggy(
        _gate: nn.Module, _hidden: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor, index: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        biased = (logits.sigmoid() + bias).gather(1, index)
        return logits, (biased / (biased.sum(dim=-1, keepdim=True) + 1e-20) * scaling).to(weights.dtype), index

    _replace_router_output(block, entry, buggy)


vision_bias_in_weights = HFBlockBackend("vision-bias-in-weights", patch=_vision_bias_in_weights)


# bug → (architecture, checks that must go red, checks that must stay green)
SEEDED: dict[str, tuple[str, set[str], set[str]]] = {
    "shared_outside_normaliser": ("inkling_text", {"routing_weights", "output", "grad_router"}, {"routing"}),
    "shared_gammas_swapped": (
        "inkling_text",
        {"output", "grad_shared_experts"},
        {"routing", "routing_weights", "grad_experts"},
    ),
    "global_scale_untrained": (
        "inkling_text",
        {"grad_router"},
        {"routing", "routing_weights", "output", "grad_input", "grad_experts", "grad_shared_experts"},
    ),
    "vision_bias_in_weights": ("dots3_note_vision_encoder", {"routing_weights", "output"}, {"routing"}),
}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("bug", sorted(SEEDED))
def test_seeded_bug_is_reported_under_the_right_check(bug: str, dtype: str) -> None:
    arch, must_fail, must_pass = SEEDED[bug]
    records = records_of(arch, f"tests.test_gated_shared_family:{bug}", dtype)
    assert_caught(bug, records, must_fail, must_pass)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["inkling_text", "inkling_mm_model", "dots3_note_vision_encoder"])
def test_the_real_blocks_pass_the_same_selection(arch: str, dtype: str) -> None:
    """Control: red above means the bug, not the entry."""
    records = records_of(arch, "hf-eager", dtype)
    assert records and red(records) == set() and not [r for r in records if r.status == "xfail"]
