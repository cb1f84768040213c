"""PhiMoE's SparseMixer and JetMoE's output bias / grouped routing: the reference formulas on hand-checked
values, and proof that each new feature can fail (seeded bugs turn the intended check red; the real
blocks pass).

The seeded backends below plug in as an outsider's would (``--backend tests.test_mixer_family:NAME``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from torch import nn

from moeconf.backends import HFBlockBackend
from moeconf.harness.cases import draw_params
from moeconf.hf.block import build_block, load_params, recording, ungroup_routing
from moeconf.reference import reference_forward, route
from moeconf.registry import REGISTRY, ArchEntry
from moeconf.spec import MoESpec, RouterSpec
from tests.records import assert_caught, records_of, red

INF = float("inf")

# --- the reference ---------------------------------------------------------------------------------


def sparsemixer_spec(num_experts: int, eps: float, top_k: int = 2) -> MoESpec:
    router = RouterSpec(select_on="logits", weight_from="sparsemixer", sparsemixer_eps=eps)
    return MoESpec(num_experts, top_k, 4, 3, router=router)


def route_logits(spec: MoESpec, logits: list[list[float]]) -> Any:
    """Route tokens whose logits are given: the router weight is the identity on the first E dims."""
    weight = torch.eye(spec.num_experts, spec.hidden, dtype=torch.float64)
    return route(spec, {"router.weight": weight}, torch.tensor(logits, dtype=torch.float64))


def test_sparsemixer_weights_on_a_hand_checked_logit_vector() -> None:
    """ℓ = [-1, 4, 3.6, 3], 2ε = 0.2.
    Pick 1 = expert 1 (m = 4): r = 0.4/4 = 0.1 (3.6 kept), 1/4 = 0.25 and 5/4 (3 and -1 masked) → w = σ(0.4).
    Pick 2 = expert 2 (m = 3.6), expert 1 at −inf: r = 0.6/3.6 = 0.167 (3 kept), 4.6/3.6 (-1 masked) → w = σ(0.6).
    """
    routing = route_logits(sparsemixer_spec(4, 0.1), [[-1.0, 4.0, 3.6, 3.0]])
    assert routing.index.tolist() == [[1, 2]]
    expected = [1 / (1 + math.exp(-0.4)), 1 / (1 + math.exp(-0.6))]
    assert torch.allclose(routing.weights, torch.tensor([expected], dtype=torch.float64))
    # The closest mask decision: expert 3 at pick 2, r = 0.6/3.6 vs 2ε = 0.2 (the top-2 gap is 0.6/5 = 0.12).
    assert math.isclose(float(routing.margin[0]), 0.2 - 0.6 / 3.6)


def test_sparsemixer_divides_by_the_logit_magnitude_when_the_pick_is_negative() -> None:
    """ℓ = [-2, -1, -1.1, -3], 2ε = 0.2: max(|ℓ_i|, m) = |ℓ_i| since m = -1 < 0.
    Pick 1 (expert 1): r = 0.1/1.1 (-1.1 kept), 1/2 and 2/3 (masked) → w = σ(0.1).
    Pick 2 (expert 2, m = -1.1): r = 0.9/2 and 1.9/3 (masked) → w = 1."""
    routing = route_logits(sparsemixer_spec(4, 0.1), [[-2.0, -1.0, -1.1, -3.0]])
    assert routing.index.tolist() == [[1, 2]]
    assert torch.allclose(routing.weights, torch.tensor([[1 / (1 + math.exp(-0.1)), 1.0]], dtype=torch.float64))


def test_sparsemixer_with_a_zero_eps_gives_unit_weights_and_a_large_eps_a_plain_softmax() -> None:
    """The two limits: 2ε = 0 keeps only the pick (weight 1); a huge ε keeps everything still in play."""
    logits = [[0.5, 2.0, -1.0, 1.5]]
    assert torch.allclose(route_logits(sparsemixer_spec(4, 0.0), logits).weights, torch.ones(1, 2, dtype=torch.float64))
    wide = route_logits(sparsemixer_spec(4, 1e6), logits)
    first = torch.softmax(torch.tensor(logits[0], dtype=torch.float64), 0)[1]
    second = torch.softmax(torch.tensor([0.5, -1.0, 1.5], dtype=torch.float64), 0)[2]  # expert 1 at −inf
    assert torch.allclose(wide.weights, torch.stack([first, second]).unsqueeze(0))


def test_sparsemixer_weights_carry_the_gradient_of_the_kept_logits_only() -> None:
    spec = sparsemixer_spec(4, 0.1)
    logits = torch.tensor([[-1.0, 4.0, 3.6, 3.0]], dtype=torch.float64, requires_grad=True)
    routing = route(spec, {"router.weight": torch.eye(4, 4, dtype=torch.float64)}, logits)
    (grad,) = torch.autograd.grad(routing.weights.sum(), logits)
    # Expert 0 is masked in both picks; pick 1's softmax sees {1, 2}, pick 2's sees {2, 3}.
    assert grad[0, 0] == 0 and (grad[0, 1:] != 0).all()


def test_sparsemixer_spec_refuses_a_selection_it_cannot_make() -> None:
    with pytest.raises(ValueError, match="sparsemixer"):
        MoESpec(4, 2, 4, 3, router=RouterSpec(select_on="scores", weight_from="sparsemixer"))
    with pytest.raises(ValueError, match="sparsemixer"):
        MoESpec(4, 2, 4, 3, router=RouterSpec(select_on="logits", weight_from="sparsemixer", selection_bias=True))


def test_output_bias_is_added_once_to_every_token() -> None:
    spec = REGISTRY["jetmoe"].spec
    params = draw_params(spec, 0)
    x = torch.randn(2, 3, spec.hidden, dtype=torch.float64)
    with_bias = reference_forward(spec, params, x).output
    without = reference_forward(dataclasses.replace(spec, output_bias=False), params, x).output
    assert torch.allclose(with_bias - without, params["output.bias"].expand_as(x))


def test_ungroup_routing_inverts_an_expert_sorted_router_output() -> None:
    """Two tokens, k = 2: token 0 → experts (2, 0), token 1 → (0, 1). Flat slots 0..3 = (t0s0, t0s1, t1s0,
    t1s1); sorted by expert: slot 1 (e0), slot 2 (e0), slot 3 (e1), slot 0 (e2)."""
    order = torch.tensor([1, 2, 3, 0])
    gates = torch.tensor([0.3, 0.6, 0.4, 0.7])
    index, weights = ungroup_routing((order, order // 2, gates, [2, 1, 1]), top_k=2)
    assert index.tolist() == [[2, 0], [0, 1]]
    assert torch.allclose(weights, torch.tensor([[0.7, 0.3], [0.6, 0.4]]))


# --- upstream facts the entries rely on ------------------------------------------------------------


def _phimoe_block(top_k: int = 2) -> tuple[ArchEntry, nn.Module]:
    base = REGISTRY["phimoe"]
    entry = dataclasses.replace(
        base,
        config_kwargs={**base.config_kwargs, "num_experts_per_tok": top_k},
        spec=dataclasses.replace(base.spec, top_k=top_k),
    )
    block = build_block(entry, "eager")
    load_params(entry, block, draw_params(entry.spec, 0))
    return entry, block


def test_phimoe_training_forward_samples_its_experts() -> None:
    """Why the entry runs eval(): in training, SparseMixer draws each pick by Gumbel-max over the masked
    logits (modeling_phimoe.py:366-374), so two seeds route the same tokens differently."""
    entry, block = _phimoe_block()
    router = block.get_submodule(entry.router_path)
    block.train()
    x = torch.randn(64, entry.spec.hidden, generator=torch.Generator().manual_seed(0))

    def picks(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            return router(x)[2].sort(dim=-1).values

    with torch.random.fork_rng(devices=[]):
        assert not torch.equal(picks(0), picks(1))
    block.eval()
    with torch.no_grad():
        eval_picks = router(x)[2].sort(dim=-1).values
    reference = route(entry.spec, draw_params(entry.spec, 0), x.double()).index
    assert torch.equal(eval_picks, reference)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="upstream: sparsemixer(scores, jitter_eps, training, top_k=2) never reads top_k "
    "(transformers 5.24 models/phimoe/modeling_phimoe.py:340; passed at :478), so num_experts_per_tok=3 routes 2",
)
def test_phimoe_routes_num_experts_per_tok_experts() -> None:
    entry, block = _phimoe_block(top_k=3)
    block.eval()
    x = torch.randn(8, entry.spec.hidden, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        selected = block.get_submodule(entry.router_path)(x)[2]
    assert selected.shape == (8, 3)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="upstream: with input_jitter_noise > 0 the block (transformers 5.24 models/phimoe/modeling_phimoe.py:507-510) "
    "and then the router (:472-475) each multiply the same storage in place by U[1-n, 1+n]: the factor is doubled",
)
def test_phimoe_input_jitter_stays_within_its_range() -> None:
    """Training-only (the checks run in eval with no jitter): the experts' input over the block's input."""
    base = REGISTRY["phimoe"]
    noise = 0.5
    entry = dataclasses.replace(base, config_kwargs={**base.config_kwargs, "input_jitter_noise": noise})
    block = build_block(entry, "eager")
    load_params(entry, block, draw_params(entry.spec, 0))
    block.train()
    x = 1.0 + torch.rand(4, 16, entry.spec.hidden, generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng(devices=[]), torch.no_grad(), recording(entry, block) as rec:
        torch.manual_seed(0)
        block(x.clone())  # the block scales its input in place
    factor = rec.experts_args[0] / x.reshape(-1, entry.spec.hidden)
    assert float(factor.min()) >= 1 - noise - 1e-6 and float(factor.max()) <= 1 + noise + 1e-6


def test_jetmoe_attention_is_a_routed_mixture_recorded_with_the_mlp() -> None:
    """JetMoE's attention (JetMoeMoA) routes with the same gating class as the MLP block, so the model's
    recorder (OutputRecorder(JetMoeTopKGating, index=4), modeling_jetmoe.py:556) collects two router
    logit tensors per layer and the model's aux loss balances both mixtures."""
    import transformers

    from moeconf.hf.block import build_config

    entry = REGISTRY["jetmoe"]
    config = build_config(entry)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, entry.model_class)(config)
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, config.vocab_size, (1, 5)), output_router_logits=True)
    assert len(out.router_logits) == 2 * config.num_hidden_layers
    # The block-level recording (what the checks read) sees only the MLP block's router.
    block = build_block(entry)
    load_params(entry, block, draw_params(entry.spec, 0))
    with torch.no_grad(), recording(entry, block) as rec:
        block(torch.randn(1, 5, config.hidden_size))
    assert rec.recorded_count == 1


# --- seeded bugs -------------------------------------------------------------------------------------


def _replace_router_output(block: nn.Module, entry: ArchEntry, fn: Any) -> None:
    block.get_submodule(entry.router_path).register_forward_hook(lambda _m, _a, out: fn(*out))


def _second_pick_softmax(logits: torch.Tensor, index: torch.Tensor, eps: float, hide_first: bool) -> torch.Tensor:
    """A hand-written SparseMixer second weight ``[N, 1]``, optionally forgetting the first pick's −inf."""
    first, second = index[:, :1], index[:, 1:]
    top = logits.detach().gather(1, second)
    masked = ((top - logits.detach()) / logits.detach().abs().clamp(min=top)) > 2 * eps
    if hide_first:
        masked = masked.scatter(1, first, True)
    return torch.softmax(logits.masked_fill(masked, -INF), dim=-1).gather(1, second)


def _first_pick_kept(block: nn.Module, entry: ArchEntry) -> None:
    """SparseMixer whose second softmax still sees the first pick (it sits above the pick: r < 0, never masked)."""
    eps = entry.spec.router.sparsemixer_eps

    def buggy(logits: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        second = _second_pick_softmax(logits, index, eps, hide_first=False).to(weights.dtype)
        return logits, torch.cat((weights[:, :1], second), dim=-1), index

    _replace_router_output(block, entry, buggy)


sparsemixer_first_pick_kept = HFBlockBackend("sparsemixer-first-pick-kept", patch=_first_pick_kept)


def _no_threshold_mask(block: nn.Module, entry: ArchEntry) -> None:
    """SparseMixer without the 2ε mask: each pick weighted by a softmax over everything still in play."""

    def buggy(logits: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        first = torch.softmax(logits, dim=-1).gather(1, index[:, :1])
        second = _second_pick_softmax(logits, index, INF, hide_first=True)
        return logits, torch.cat((first, second), dim=-1).to(weights.dtype), index

    _replace_router_output(block, entry, buggy)


sparsemixer_unmasked = HFBlockBackend("sparsemixer-unmasked", patch=_no_threshold_mask)


def _bias_twice(block: nn.Module, entry: ArchEntry) -> None:
    bias = block.get_parameter("bias")
    block.register_forward_hook(lambda _m, _a, out: out + bias)


output_bias_twice = HFBlockBackend("output-bias-twice", patch=_bias_twice)


def _bias_dropped(block: nn.Module, entry: ArchEntry) -> None:
    """A fused MoE kernel with no output-bias argument: the bias is neither added nor trained."""
    zeros = torch.zeros_like(block.get_parameter("bias").detach())
    del block.bias
    block.bias = zeros  # a plain tensor: the block adds zero


output_bias_dropped = HFBlockBackend("output-bias-dropped", patch=_bias_dropped)


def _gates_in_slot_order(block: nn.Module, entry: ArchEntry) -> None:
    """JetMoE's router forgetting to permute the gates with the rows (``top_k_gates.flatten()`` used as is):
    each expert-sorted row is weighted by another slot's gate."""

    def buggy(order: torch.Tensor, token: torch.Tensor, gates: torch.Tensor, *rest: Any) -> tuple[Any, ...]:
        return (order, token, torch.empty_like(gates).scatter(0, order, gates), *rest)

    _replace_router_output(block, entry, buggy)


gates_in_slot_order = HFBlockBackend("gates-in-slot-order", patch=_gates_in_slot_order)


# bug → (architecture, checks that must go red, checks that must stay green)
SEEDED: dict[str, tuple[str, set[str], set[str]]] = {
    "sparsemixer_first_pick_kept": ("phimoe", {"routing_weights", "output"}, {"routing", "aux_loss"}),
    "sparsemixer_unmasked": ("phimoe", {"routing_weights", "output"}, {"routing", "aux_loss"}),
    "output_bias_twice": (
        "jetmoe",
        {"output", "grad_experts"},
        {"routing", "routing_weights", "grad_input", "grad_router", "aux_loss"},
    ),
    "output_bias_dropped": ("jetmoe", {"output", "grad_experts"}, {"routing", "routing_weights", "grad_input"}),
    "gates_in_slot_order": ("jetmoe", {"routing_weights", "output"}, {"routing", "aux_loss"}),
}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("bug", sorted(SEEDED))
def test_seeded_bug_is_reported_under_the_right_check(bug: str, dtype: str) -> None:
    arch, must_fail, must_pass = SEEDED[bug]
    records = records_of(arch, f"tests.test_mixer_family:{bug}", dtype)
    assert_caught(bug, records, must_fail, must_pass)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["phimoe", "jetmoe"])
def test_the_real_blocks_pass_the_same_selection(arch: str, dtype: str) -> None:
    """Control: red above means the bug, not the entry."""
    records = records_of(arch, "hf-eager", dtype)
    assert red(records) == set() and not [r for r in records if r.status == "xfail"]
