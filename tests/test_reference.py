"""The reference itself: hand-computed formulas and hypothesis properties of routing and dispatch."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeconf.harness.cases import draw_params
from moeconf.reference import (
    grouped_matmul,
    load_balancing_loss,
    make_dispatch,
    permute,
    reference_forward,
    route,
    router_z_loss,
    unpermute,
)
from moeconf.spec import Capacity, ExpertSpec, GroupLimit, MoESpec, RouterSpec, SharedSpec

FAST = settings(max_examples=40, deadline=None)

ROUTERS = {
    "softmax_renorm": RouterSpec(renorm="always"),
    "softmax_plain": RouterSpec(),
    "pnorm": RouterSpec(renorm="pnorm", renorm_p=2.0),
    "topk_softmax_bias": RouterSpec(logit_bias=True, select_on="logits", weight_from="softmax_of_selected_logits"),
    "dsv3": RouterSpec(
        scoring="sigmoid",
        selection_bias=True,
        renorm="always",
        renorm_eps=1e-20,
        group_limit=GroupLimit(2, 1),
        routed_scaling=2.5,
    ),
    "dsv2": RouterSpec(group_limit=GroupLimit(2, 1, score="max", fill="zero"), routed_scaling=1.5),
    "llama4": RouterSpec(scoring="sigmoid", select_on="logits", weight_from="sigmoid_of_selected_logits"),
    "sigmoid_out_scaled": RouterSpec(
        scoring="sigmoid", selection_bias=True, renorm="always", routed_scaling=2.0, scaling_site="output"
    ),
}
EXPERTS = {
    "swiglu": ExpertSpec(),
    "gptoss": ExpertSpec(glu="gptoss_clamped", bias=True),
    "relu2": ExpertSpec(activation="relu2", glu="none"),
    "input_weighted": ExpertSpec(weight_site="input"),
}


def make_spec(router: str, experts: str, shared: str | None) -> MoESpec:
    shared_spec = None if shared is None else SharedSpec(6, gate=shared)  # type: ignore[arg-type]
    return MoESpec(8, 2, 12, 10, router=ROUTERS[router], experts=EXPERTS[experts], shared=shared_spec)


specs = st.builds(
    make_spec,
    st.sampled_from(sorted(ROUTERS)),
    st.sampled_from(sorted(EXPERTS)),
    st.sampled_from([None, "none", "sigmoid"]),
)


# --- hand-computed formulas ---------------------------------------------------------------------
def test_softmax_topk_renormalised_by_hand() -> None:
    spec = MoESpec(4, 2, 2, 2, router=RouterSpec(renorm="always"))
    params = {"router.weight": torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)}
    x = torch.tensor([[2.0, 1.0]], dtype=torch.float64)  # logits 2, 1, -2, 0
    r = route(spec, params, x)
    assert r.index.tolist() == [[0, 1]]
    e = math.exp
    assert torch.allclose(r.weights, torch.tensor([[e(2) / (e(2) + e(1)), e(1) / (e(2) + e(1))]], dtype=torch.float64))


def test_deepseek_v3_group_limit_and_bias_by_hand() -> None:
    # Two groups of two. Group 1 has the best single score, group 0 the best top-2 sum: group 0 wins.
    spec = MoESpec(
        4,
        2,
        4,
        2,
        router=RouterSpec(
            scoring="sigmoid", selection_bias=True, renorm="always", group_limit=GroupLimit(2, 1), routed_scaling=2.0
        ),
    )
    logits = torch.tensor([[1.0, 1.0, 3.0, -3.0]], dtype=torch.float64)
    params = {
        "router.weight": torch.eye(4, dtype=torch.float64),
        "router.selection_bias": torch.zeros(4, dtype=torch.float64),
    }
    r = route(spec, params, logits)
    assert r.index.tolist() == [[0, 1]]
    assert torch.allclose(r.weights, torch.tensor([[1.0, 1.0]], dtype=torch.float64))  # renormalised, ×2
    # A selection bias changes the choice but never the weights: bias pushes expert 3 into group 1's lead.
    params["router.selection_bias"] = torch.tensor([0.0, 0.0, 0.0, 2.0], dtype=torch.float64)
    r = route(spec, params, logits)
    s = torch.sigmoid(logits[0])
    assert r.index.tolist() == [[2, 3]]
    assert torch.allclose(r.weights[0], 2 * s[[2, 3]] / s[[2, 3]].sum())


def test_llama4_scales_the_expert_input() -> None:
    spec = MoESpec(2, 1, 3, 4, router=ROUTERS["llama4"], experts=ExpertSpec(weight_site="input"))
    params = draw_params(spec, 0)
    x = torch.randn(1, 1, 3, dtype=torch.float64)
    out_in = reference_forward(spec, params, x).output
    out_out = reference_forward(MoESpec(2, 1, 3, 4, router=ROUTERS["llama4"]), params, x).output
    assert not torch.allclose(out_in, out_out)  # SwiGLU is not linear: the site matters


def test_aux_loss_uniform_is_k_and_mask_drops_rows() -> None:
    logits = torch.zeros(6, 4, dtype=torch.float64)
    assert math.isclose(float(load_balancing_loss(logits, 2)), 2.0)
    logits = torch.randn(2, 3, 4, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    masked = load_balancing_loss(logits.reshape(6, 4), 2, mask)
    kept = load_balancing_loss(logits.reshape(6, 4)[1:], 2)
    assert torch.allclose(masked, kept)


def test_z_loss_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    expected = (math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2
    assert math.isclose(float(router_z_loss(logits)), expected)
    assert math.isclose(float(router_z_loss(logits, torch.tensor([[0, 1]]))), (1 + math.log(2)) ** 2)


def test_capacity_drops_later_tokens() -> None:
    spec = MoESpec(2, 1, 2, 2, router=RouterSpec(capacity=Capacity(2)))
    params = {"router.weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)}
    x = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]], dtype=torch.float64)
    r = route(spec, params, x, tokens_per_sequence=4)
    assert r.kept.flatten().tolist() == [True, True, False, True]


# --- properties ---------------------------------------------------------------------------------
@FAST
@given(st.integers(1, 24), st.integers(1, 4), st.integers(2, 6), st.integers(0, 2**16))
def test_permute_unpermute_with_weights_one_over_k_is_identity(n: int, k: int, e: int, seed: int) -> None:
    k = min(k, e)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    index = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    d = make_dispatch(index, e)
    assert torch.allclose(unpermute(permute(x, d), d, torch.full((n, k), 1.0 / k, dtype=torch.float64)), x)
    assert int(d.counts.sum()) == n * k
    assert torch.equal(index.reshape(-1)[d.order], index.reshape(-1).sort(stable=True).values)


@FAST
@given(st.integers(1, 16), st.integers(0, 2**16))
def test_grouped_matmul_equals_per_token_loop(n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    e, k = 4, 2
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    w = torch.randn(e, 3, 5, generator=g, dtype=torch.float64)
    index = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    weights = torch.rand(n, k, generator=g, dtype=torch.float64)
    d = make_dispatch(index, e)
    got = unpermute(grouped_matmul(permute(x, d), w, d.counts), d, weights)
    want = torch.stack([sum(weights[t, s] * (w[index[t, s]] @ x[t]) for s in range(k)) for t in range(n)])
    assert torch.allclose(got, want)


@FAST
@given(specs, st.integers(0, 2**16))
def test_token_order_equivariance(spec: MoESpec, seed: int) -> None:
    params = draw_params(spec, seed)
    x = torch.randn(1, 7, spec.hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(seed + 1))
    out = reference_forward(spec, params, x).output
    assert torch.allclose(reference_forward(spec, params, x[:, perm]).output, out[:, perm])


@FAST
@given(specs, st.integers(0, 2**16), st.integers(1, 5))
def test_batch_split_invariance(spec: MoESpec, seed: int, split: int) -> None:
    params = draw_params(spec, seed)
    x = torch.randn(6, 2, spec.hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    whole = reference_forward(spec, params, x).output
    parts = torch.cat(
        [reference_forward(spec, params, x[:split]).output, reference_forward(spec, params, x[split:]).output]
    )
    assert torch.allclose(whole, parts)


@FAST
@given(specs, st.integers(0, 2**16))
def test_routing_invariants(spec: MoESpec, seed: int) -> None:
    params = draw_params(spec, seed)
    x = torch.randn(9, spec.hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r = route(spec, params, x)
    assert r.index.shape == (9, spec.top_k)
    assert all(len(set(row)) == spec.top_k for row in r.index.tolist())  # distinct experts
    assert (r.weights >= 0).all()
    if spec.router.renorm == "always":
        expected = spec.router.routed_scaling if spec.router.scaling_site == "weights" else 1.0
        assert torch.allclose(r.weights.sum(-1), torch.full((9,), expected, dtype=torch.float64))
    group = spec.router.group_limit
    if group is not None and group.fill == "-inf":
        groups_used = r.index // (spec.num_experts // group.n_group)
        assert all(len(set(row)) <= group.topk_group for row in groups_used.tolist())
