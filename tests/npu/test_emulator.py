"""Conformance of the pure-torch torch_npu MoE emulator (moeconf.npu) against the semantics in
docs/torch-npu-ops.md: hand-computed examples, property tests against naive python loops, gradients,
rejections, the per-release rules and the ``torch_npu`` stand-in module.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import textwrap
from collections.abc import Callable
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from moeconf.npu import emulator
from moeconf.npu.emulator import (
    DEFAULT_RULES,
    MAX_INDEX,
    RULES,
    RULES_ENV,
    current_rules,
    grouped_matmul_autograd,
    npu_grouped_matmul,
    npu_moe_token_permute,
    npu_moe_token_unpermute,
    npu_swiglu,
    resolve_rules,
    torch_npu_rules,
)
from moeconf.npu.fake_torch_npu import (
    EMULATED_OPS,
    emulated_torch_npu,
    emulator_module,
    get_torch_npu,
    is_emulator,
    torch_npu_emulator,  # noqa: F401  (pytest fixture)
)

PROPERTY = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _default_release_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts from the default (newest) rules, whatever the caller's environment selects."""
    monkeypatch.delenv(RULES_ENV, raising=False)


# ----------------------------------------------------------------------------------------------------------------
# naive python-loop references (independent of the emulator's argsort/gather code)
# ----------------------------------------------------------------------------------------------------------------


def stable_expert_order(indices: Tensor) -> list[int]:
    """Flat slots t*K+k sorted by expert id, ties by slot (python's sort is stable)."""
    flat = indices.reshape(-1).tolist()
    return sorted(range(len(flat)), key=lambda slot: flat[slot])


def naive_permute(tokens: Tensor, indices: Tensor, num_out: int) -> tuple[Tensor, list[int]]:
    """-> permuted [num_out, H] and the inverse map (flat slot -> permuted row) as a python list."""
    topk = 1 if indices.dim() == 1 else indices.size(1)
    order = stable_expert_order(indices)
    rows = [tokens[slot // topk] for slot in order[:num_out]]
    permuted = torch.stack(rows) if rows else tokens[:0]  # keep the autograd link when empty
    inverse = [0] * len(order)
    for row, slot in enumerate(order):
        inverse[slot] = row
    return permuted, inverse


def naive_unpermute(permuted: Tensor, inverse: list[int], probs: Tensor | None, topk: int) -> Tensor:
    """out[t] = sum_k probs[t,k] * permuted[inverse[t*K+k]], skipping dropped slots (row >= P)."""
    num_tokens = len(inverse) // topk
    out = []
    for t in range(num_tokens):
        acc = permuted[:0].sum(dim=0)  # zeros that stay on the autograd graph even if every copy is dropped
        for k in range(topk):
            row = inverse[t * topk + k]
            if row < permuted.size(0):
                weight = 1.0 if probs is None else probs[t, k]
                acc = acc + weight * permuted[row]
        out.append(acc)
    return torch.stack(out) if out else permuted[:0]


def naive_grouped_mm(x: Tensor, weight: Tensor, counts: list[int]) -> Tensor:
    """y[rows of group e] = x[rows] @ weight[e]; weight [E, K, N]."""
    blocks, start = [], 0
    for expert, count in enumerate(counts):
        blocks.append(x[start : start + count] @ weight[expert])
        start += count
    return torch.cat(blocks) if blocks else x.new_zeros((0, weight.size(2)))


def cumsum_list(counts: list[int]) -> list[int]:
    out, total = [], 0
    for count in counts:
        total += count
        out.append(total)
    return out


# ----------------------------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def routing_cases(draw: st.DrawFn) -> dict:
    """Small routing problems: T in 0..6 (T=1 and zero-token experts included), K 1..4, E 1..5."""
    num_tokens = draw(st.integers(0, 6))
    topk = draw(st.integers(1, 4))
    num_experts = draw(st.integers(1, 5))
    hidden = draw(st.integers(1, 4))
    total = num_tokens * topk
    num_out = draw(st.one_of(st.none(), st.just(0), st.integers(1, total + 2), st.integers(-(total + 1), -1)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    indices = torch.randint(0, num_experts, (num_tokens, topk), generator=gen)
    if topk == 1 and draw(st.booleans()):
        indices = indices.reshape(-1)  # [T] form means K=1
    index_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    return {
        "tokens": torch.randn(num_tokens, hidden, generator=gen),
        "indices": indices.to(index_dtype),
        "topk": topk,
        "num_out": num_out,
        "probs": torch.rand(num_tokens, topk, generator=gen),
        "total": total,
    }


def expected_num_out(num_out: int | None, total: int) -> int:
    if not num_out:
        return total
    return min(num_out, total) if num_out > 0 else max(total + num_out, 0)


@st.composite
def grouped_cases(draw: st.DrawFn) -> dict:
    """counts per expert (zeros allowed), x [M, K], weight [E, K, N] in fp32."""
    counts = draw(st.lists(st.integers(0, 4), min_size=1, max_size=5))
    k_dim, n_dim = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return {
        "counts": counts,
        "x": torch.randn(sum(counts), k_dim, generator=gen),
        "weight": torch.randn(len(counts), k_dim, n_dim, generator=gen),
        "grad": torch.randn(sum(counts), n_dim, generator=gen),
    }


# ----------------------------------------------------------------------------------------------------------------
# hand-computed examples
# ----------------------------------------------------------------------------------------------------------------

# Flat expert ids [0,3,3,2,3,1,0,0]: stable order by expert is slots [0,6,7 | 5 | 3 | 1,2,4], i.e. the forward map
# [0,6,7,5,3,1,2,4] (the unpermute docstring's example sorted_indices); its inverse is [0,5,6,4,7,3,1,2]
# (docs/torch-npu-ops.md, 'npu_moe_token_unpermute').
HAND_INDICES = torch.tensor([[0, 3], [3, 2], [3, 1], [0, 0]])
HAND_TOKENS = torch.tensor([[1.0], [2.0], [3.0], [4.0]])  # token t carries the value t+1
HAND_FORWARD = [0, 6, 7, 5, 3, 1, 2, 4]
HAND_INVERSE = [0, 5, 6, 4, 7, 3, 1, 2]


def test_hand_example_permute() -> None:
    permuted, sorted_indices = npu_moe_token_permute(HAND_TOKENS, HAND_INDICES)
    assert sorted_indices.dtype == torch.int32
    assert sorted_indices.tolist() == HAND_INVERSE
    # rows = tokens[forward // K] = tokens[[0,3,3,2,1,0,1,2]]
    assert permuted.flatten().tolist() == [1.0, 4.0, 4.0, 3.0, 2.0, 1.0, 2.0, 3.0]


def test_hand_example_unpermute_weights_each_copy() -> None:
    permuted, sorted_indices = npu_moe_token_permute(HAND_TOKENS, HAND_INDICES)
    probs = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    out = npu_moe_token_unpermute(permuted, sorted_indices, probs)
    # out[t] = (p[t,0] + p[t,1]) * (t+1)
    assert out.flatten().tolist() == [3.0, 14.0, 33.0, 60.0]


def test_hand_example_doc_trap_forward_map_is_not_interchangeable() -> None:
    # Feeding the docstring's forward map to unpermute mixes tokens up: torch_npu's sorted_indices is the inverse map.
    permuted, _ = npu_moe_token_permute(HAND_TOKENS, HAND_INDICES)
    probs = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    wrong = npu_moe_token_unpermute(permuted, torch.tensor(HAND_FORWARD, dtype=torch.int32), probs)
    assert wrong.flatten().tolist() != [3.0, 14.0, 33.0, 60.0]


@pytest.mark.parametrize("num_out", [5, -3])
def test_hand_example_dropped_tokens(num_out: int) -> None:
    permuted, sorted_indices = npu_moe_token_permute(HAND_TOKENS, HAND_INDICES, num_out)
    assert permuted.flatten().tolist() == [1.0, 4.0, 4.0, 3.0, 2.0]
    assert sorted_indices.tolist() == HAND_INVERSE  # still full length
    # Slots 1, 2, 4 landed on rows 5, 6, 7 (dropped): out = [1, 0+2, 0+3, 4+4].
    out = npu_moe_token_unpermute(permuted, sorted_indices, torch.ones(4, 2))
    assert out.flatten().tolist() == [1.0, 2.0, 3.0, 8.0]


@pytest.mark.parametrize(("num_out", "rows"), [(None, 8), (0, 8), (3, 3), (100, 8), (-1, 7), (-8, 0), (-100, 0)])
def test_num_out_tokens_slice_semantics(num_out: int | None, rows: int) -> None:
    permuted, sorted_indices = npu_moe_token_permute(HAND_TOKENS, HAND_INDICES, num_out)
    assert permuted.shape == (rows, 1)
    assert sorted_indices.shape == (8,)


def test_grouped_matmul_hand_example_with_bias() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    weight = torch.stack([torch.eye(2), 2 * torch.eye(2), 3 * torch.eye(2)])
    bias = torch.tensor([[0.0, 0.0], [9.0, 9.0], [1.0, -1.0]])
    # counts [1, 0, 2]: row 0 -> expert 0, rows 1-2 -> expert 2 (expert 1 empty)
    (y,) = npu_grouped_matmul([x], [weight], bias=[bias], group_list=[1, 1, 3], split_item=2, group_type=0)
    assert y.tolist() == [[1.0, 0.0], [1.0, 2.0], [4.0, 2.0]]


# ----------------------------------------------------------------------------------------------------------------
# permute / unpermute properties
# ----------------------------------------------------------------------------------------------------------------


@PROPERTY
@given(routing_cases())
def test_permute_matches_stable_sort_and_inverse_map(case: dict) -> None:
    tokens, indices = case["tokens"], case["indices"]
    num_out = expected_num_out(case["num_out"], case["total"])
    permuted, sorted_indices = npu_moe_token_permute(tokens, indices, case["num_out"])
    ref_permuted, ref_inverse = naive_permute(tokens, indices, num_out)
    assert permuted.dtype == tokens.dtype and sorted_indices.dtype == torch.int32
    assert torch.equal(permuted, ref_permuted)
    assert sorted_indices.tolist() == ref_inverse
    # The op test's oracle: npu_s = argsort(argsort(flat, stable), stable).
    flat = indices.reshape(-1).long()
    oracle = torch.argsort(torch.argsort(flat, stable=True), stable=True).int()
    assert torch.equal(sorted_indices, oracle)
    # int32 and int64 indices give identical results.
    other = indices.to(torch.int64 if indices.dtype == torch.int32 else torch.int32)
    permuted_b, sorted_b = npu_moe_token_permute(tokens, other, case["num_out"])
    assert torch.equal(permuted, permuted_b) and torch.equal(sorted_indices, sorted_b)


@PROPERTY
@given(routing_cases())
def test_round_trip_with_uniform_probs_is_identity(case: dict) -> None:
    tokens, topk = case["tokens"], case["topk"]
    permuted, sorted_indices = npu_moe_token_permute(tokens, case["indices"])
    probs = torch.full((tokens.size(0), topk), 1.0 / topk)
    torch.testing.assert_close(npu_moe_token_unpermute(permuted, sorted_indices, probs), tokens)
    if topk == 1:  # no weights at all: exact
        assert torch.equal(npu_moe_token_unpermute(permuted, sorted_indices), tokens)


@PROPERTY
@given(routing_cases())
def test_unpermute_matches_naive_and_megatron_scatter(case: dict) -> None:
    tokens, probs, topk = case["tokens"], case["probs"], case["topk"]
    permuted, sorted_indices = npu_moe_token_permute(tokens, case["indices"], case["num_out"])
    expert_out = permuted * 1.5 - 0.25  # anything row-wise, so the gather map matters
    out = npu_moe_token_unpermute(expert_out, sorted_indices, probs)
    torch.testing.assert_close(out, naive_unpermute(expert_out, sorted_indices.tolist(), probs, topk))
    if expert_out.size(0) == case["total"]:
        # Megatron's old reference scatters with the forward map argsort(npu_s) instead of gathering with npu_s.
        forward = torch.argsort(sorted_indices.long(), stable=True)
        scattered = torch.zeros(case["total"], tokens.size(1)).index_copy_(0, forward, expert_out)
        megatron = (scattered.reshape(-1, topk, tokens.size(1)) * probs.unsqueeze(-1)).sum(1)
        torch.testing.assert_close(out, megatron)


@PROPERTY
@given(routing_cases())
def test_permute_gradient_matches_naive_loop(case: dict) -> None:
    num_out = expected_num_out(case["num_out"], case["total"])
    tokens = case["tokens"].requires_grad_()
    ref_tokens = case["tokens"].detach().clone().requires_grad_()
    permuted, _ = npu_moe_token_permute(tokens, case["indices"], case["num_out"])
    ref_permuted, _ = naive_permute(ref_tokens, case["indices"], num_out)
    upstream = torch.randn_like(ref_permuted)
    (permuted * upstream).sum().backward()
    (ref_permuted * upstream).sum().backward()
    assert tokens.grad is not None and tokens.grad.dtype == tokens.dtype
    torch.testing.assert_close(tokens.grad, ref_tokens.grad)


@PROPERTY
@given(routing_cases(), st.booleans())
def test_unpermute_gradients_match_naive_loop(case: dict, with_probs: bool) -> None:
    topk = case["topk"] if with_probs else 1
    indices = case["indices"] if with_probs else case["indices"].reshape(-1, case["topk"])[:, :1]
    permuted, sorted_indices = npu_moe_token_permute(case["tokens"], indices, case["num_out"])
    leaves = [permuted.detach().clone().requires_grad_() for _ in range(2)]
    probs = [case["probs"][:, :topk].clone().requires_grad_() for _ in range(2)] if with_probs else [None, None]
    out = npu_moe_token_unpermute(leaves[0], sorted_indices, probs[0])
    ref = naive_unpermute(leaves[1], sorted_indices.tolist(), probs[1], topk)
    upstream = torch.randn_like(ref)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()

    def grad_or_zeros(t: Tensor) -> Tensor:
        return t.grad if t.grad is not None else torch.zeros_like(t)

    torch.testing.assert_close(grad_or_zeros(leaves[0]), grad_or_zeros(leaves[1]))
    if with_probs:
        torch.testing.assert_close(grad_or_zeros(probs[0]), grad_or_zeros(probs[1]))


def test_all_copies_dropped_gives_zero_output_and_gradients() -> None:
    permuted, sorted_indices = npu_moe_token_permute(HAND_TOKENS, HAND_INDICES, -8)
    permuted.requires_grad_()
    probs = torch.rand(4, 2, requires_grad=True)
    out = npu_moe_token_unpermute(permuted, sorted_indices, probs)
    assert torch.equal(out, torch.zeros(4, 1))
    out.sum().backward()
    assert permuted.grad.shape == (0, 1) and torch.equal(probs.grad, torch.zeros(4, 2))


def test_unpermute_mixed_dtype_grad_follows_probs() -> None:
    # bf16 tokens with fp32 probs (op-plugin test_unpermute_grad_mixed_dtype).
    permuted, sorted_indices = npu_moe_token_permute(HAND_TOKENS.bfloat16(), HAND_INDICES.int())
    permuted = permuted.detach().requires_grad_()
    probs = torch.rand(4, 2).requires_grad_()
    out = npu_moe_token_unpermute(permuted, sorted_indices, probs)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert permuted.grad.dtype == torch.bfloat16 and probs.grad.dtype == torch.float32
    # grad_probs[t,k] = <1, permuted[s[t*K+k]]> = value of token t = t+1
    torch.testing.assert_close(probs.grad, torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]))


def test_round_trip_gradient_is_identity() -> None:
    tokens = torch.randn(5, 3, requires_grad=True)
    indices = torch.tensor([[1, 0], [2, 2], [0, 1], [3, 0], [1, 3]], dtype=torch.int32)
    permuted, sorted_indices = npu_moe_token_permute(tokens, indices)
    out = npu_moe_token_unpermute(permuted, sorted_indices, torch.full((5, 2), 0.5))
    upstream = torch.randn(5, 3)
    out.backward(upstream)
    torch.testing.assert_close(tokens.grad, upstream)


@pytest.mark.parametrize("with_probs", [False, True])
def test_unpermute_saves_permuted_only_with_probs(with_probs: bool) -> None:
    indices = HAND_INDICES if with_probs else HAND_INDICES[:, 0]  # probs=None means K=1
    permuted, sorted_indices = npu_moe_token_permute(torch.randn(4, 3), indices)
    permuted.requires_grad_()
    probs = torch.rand(4, 2) if with_probs else None
    saved: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        npu_moe_token_unpermute(permuted, sorted_indices, probs)
    saves_permuted = any(t.data_ptr() == permuted.data_ptr() for t in saved)
    assert saves_permuted == with_probs  # op-plugin skips saving permuted_tokens when there is no probs


# ----------------------------------------------------------------------------------------------------------------
# grouped matmul
# ----------------------------------------------------------------------------------------------------------------


@PROPERTY
@given(grouped_cases())
def test_grouped_matmul_m_axis_matches_loop_for_every_group_list_form(case: dict) -> None:
    x, weight, counts = case["x"], case["weight"], case["counts"]
    ref = naive_grouped_mm(x, weight, counts)
    forms = [
        {"group_list": torch.tensor(counts), "group_list_type": 1},
        {"group_list": torch.tensor(cumsum_list(counts)), "group_list_type": 0},
        {"group_list": torch.tensor(cumsum_list(counts), dtype=torch.int32), "group_list_type": 0},
        {"group_list": cumsum_list(counts)},  # .List overload, cumulative
    ]
    outs = [
        npu_grouped_matmul([x], [weight], split_item=split, group_type=0, **form) for form in forms for split in (2, 3)
    ]
    for out in outs:
        assert isinstance(out, list) and len(out) == 1
        assert torch.equal(out[0], outs[0][0])
    torch.testing.assert_close(outs[0][0], ref)


@PROPERTY
@given(grouped_cases())
def test_grouped_matmul_k_axis_is_per_group_weight_gradient(case: dict) -> None:
    x, dy, counts = case["x"], case["grad"], case["counts"]
    (out,) = npu_grouped_matmul(
        [x.T], [dy], group_list=torch.tensor(counts), split_item=3, group_type=2, group_list_type=1
    )
    (out_cum,) = npu_grouped_matmul([x.T], [dy], group_list=cumsum_list(counts), split_item=3, group_type=2)
    assert out.shape == (len(counts), x.size(1), dy.size(1))
    assert torch.equal(out, out_cum)
    start = 0
    for expert, count in enumerate(counts):
        block = out[expert]
        if count == 0:
            assert torch.equal(block, torch.zeros_like(block))  # exact zeros for an empty group
        else:
            torch.testing.assert_close(block, x[start : start + count].T @ dy[start : start + count])
        start += count


@PROPERTY
@given(grouped_cases())
def test_grouped_matmul_autograd_matches_naive_loop(case: dict) -> None:
    counts = case["counts"]
    x = case["x"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    x_ref = case["x"].clone().requires_grad_()
    weight_ref = case["weight"].clone().requires_grad_()
    y = grouped_matmul_autograd(x, weight, torch.tensor(counts))
    y_ref = naive_grouped_mm(x_ref, weight_ref, counts)
    torch.testing.assert_close(y, y_ref)
    (y * case["grad"]).sum().backward()
    (y_ref * case["grad"]).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad if x_ref.grad is not None else torch.zeros_like(x))
    torch.testing.assert_close(
        weight.grad, weight_ref.grad if weight_ref.grad is not None else torch.zeros_like(weight)
    )
    for expert, count in enumerate(counts):
        if count == 0:  # regression: ms-swift #8207 (NaN grads on the grouped path)
            assert torch.equal(weight.grad[expert], torch.zeros_like(weight.grad[expert]))


def test_grouped_matmul_autograd_accepts_python_counts_and_ops_module() -> None:
    x, weight = torch.randn(3, 2, requires_grad=True), torch.randn(2, 2, 4, requires_grad=True)
    y = grouped_matmul_autograd(x, weight, [3, 0], ops=emulator_module())
    y.sum().backward()
    assert torch.equal(weight.grad[1], torch.zeros(2, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grouped_matmul_low_precision_keeps_dtype(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(6, 8, generator=gen) * 0.1, torch.randn(3, 8, 5, generator=gen) * 0.1
    (y,) = npu_grouped_matmul([x.to(dtype)], [weight.to(dtype)], group_list=[2, 2, 6], split_item=2, group_type=0)
    assert y.dtype == dtype
    ref = naive_grouped_mm(x.to(dtype).float(), weight.to(dtype).float(), [2, 0, 4])
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-3)


def test_grouped_matmul_accepts_default_valued_optional_arguments() -> None:
    # The older call style passes empty lists for unused tensor-list arguments; output_dtype may repeat x's dtype.
    expected = npu_grouped_matmul([_X], [_W], group_list=_CNT, split_item=2, group_type=0, group_list_type=1)
    (y,) = npu_grouped_matmul(
        [_X],
        [_W],
        bias=[],
        scale=[],
        offset=[],
        antiquant_scale=[],
        antiquant_offset=[],
        group_list=_CNT,
        split_item=2,
        group_type=0,
        group_list_type=1,
        act_type=0,
        output_dtype=torch.float32,
    )
    torch.testing.assert_close(y, expected[0])


def test_grouped_matmul_has_no_autograd() -> None:
    x, weight = torch.randn(2, 3, requires_grad=True), torch.randn(1, 3, 2)
    (y,) = npu_grouped_matmul([x], [weight], group_list=[2], split_item=2, group_type=0)
    with pytest.raises(RuntimeError, match="no autograd"):
        y.sum().backward()
    with torch.no_grad():
        (y_plain,) = npu_grouped_matmul([x], [weight], group_list=[2], split_item=2, group_type=0)
    assert not y_plain.requires_grad
    torch.testing.assert_close(y.detach(), y_plain)


def test_grouped_matmul_ungrouped_form() -> None:
    xs = [torch.randn(2, 3).half(), torch.randn(4, 5).half()]
    ws = [torch.randn(3, 2).half(), torch.randn(5, 1).half()]
    ys = npu_grouped_matmul(xs, ws)
    assert [y.shape for y in ys] == [(2, 2), (4, 1)]
    torch.testing.assert_close(ys[1].float(), xs[1].float() @ ws[1].float(), rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# swiglu
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def swiglu_cases(draw: st.DrawFn) -> tuple[Tensor, int]:
    shape = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    shape[dim] *= 2
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.randn(*shape, generator=gen) * 3, dim


@PROPERTY
@given(swiglu_cases())
def test_swiglu_matches_reference_forward_and_backward(case: tuple[Tensor, int]) -> None:
    base, dim = case
    x, x_ref = base.clone().requires_grad_(), base.clone().requires_grad_()
    out = npu_swiglu(x, dim=dim)
    gate, up = x_ref.chunk(2, dim=dim)  # A (gate) is the first half
    ref = F.silu(gate) * up
    torch.testing.assert_close(out, ref)
    upstream = torch.randn_like(ref)
    out.backward(upstream)
    ref.backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad)
    # The note's closed form: grad_A = g*B*s*(1 + A*(1-s)), grad_B = g*silu(A).
    a, b = base.chunk(2, dim=dim)
    s = torch.sigmoid(a)
    closed = torch.cat([upstream * b * s * (1 + a * (1 - s)), upstream * F.silu(a)], dim=dim)
    torch.testing.assert_close(x.grad, closed)


def test_swiglu_hand_example_and_dtype() -> None:
    x = torch.tensor([[0.0, 1.0, 5.0, 7.0]])  # A = [0, 1], B = [5, 7]
    expected = torch.tensor([[0.0, 7.0 * torch.sigmoid(torch.tensor(1.0)).item()]])
    torch.testing.assert_close(npu_swiglu(x), expected)
    assert npu_swiglu(x.bfloat16()).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------------
# rejections
# ----------------------------------------------------------------------------------------------------------------

_TOK = torch.zeros(4, 2)
_IDX = torch.zeros(4, 2, dtype=torch.int64)
_SORTED = torch.arange(8, dtype=torch.int32)
_X = torch.randn(4, 3)
_W = torch.randn(2, 3, 5)
_CNT = torch.tensor([1, 3])


def _gmm(**overrides: object) -> Callable[[], object]:
    args: dict = {"x": [_X], "weight": [_W], "group_list": _CNT, "split_item": 2, "group_type": 0, "group_list_type": 1}
    args.update(overrides)
    return lambda: npu_grouped_matmul(args.pop("x"), args.pop("weight"), **args)


REJECTIONS: list[tuple[str, Callable[[], object], str]] = [
    # npu_moe_token_permute
    (
        "permute-topk>512",
        lambda: npu_moe_token_permute(torch.zeros(1, 2), torch.zeros(1, 513, dtype=torch.int64)),
        "indices",
    ),
    (
        "permute-numel>=16777215",
        lambda: npu_moe_token_permute(
            torch.zeros(1, 1).expand(MAX_INDEX, 1), torch.zeros(1, 1, dtype=torch.int32).expand(MAX_INDEX, 1)
        ),
        "indices",
    ),
    ("permute-padded_mode", lambda: npu_moe_token_permute(_TOK, _IDX, padded_mode=True), "padded_mode"),
    ("permute-float-indices", lambda: npu_moe_token_permute(_TOK, _IDX.float()), "indices"),
    ("permute-negative-expert", lambda: npu_moe_token_permute(_TOK, _IDX - 1), "indices"),
    ("permute-expert>=16777215", lambda: npu_moe_token_permute(_TOK, _IDX + MAX_INDEX), "indices"),
    ("permute-row-mismatch", lambda: npu_moe_token_permute(_TOK, _IDX[:3]), "indices"),
    ("permute-3d-indices", lambda: npu_moe_token_permute(_TOK, _IDX.unsqueeze(0)), "indices"),
    ("permute-3d-tokens", lambda: npu_moe_token_permute(_TOK.unsqueeze(0), _IDX), "tokens"),
    ("permute-int-tokens", lambda: npu_moe_token_permute(_TOK.long(), _IDX), "tokens"),
    ("permute-float64-tokens", lambda: npu_moe_token_permute(_TOK.double(), _IDX), "tokens"),
    ("permute-float-num_out", lambda: npu_moe_token_permute(_TOK, _IDX, 2.0), "num_out_tokens"),
    # npu_moe_token_unpermute
    (
        "unpermute-padded_mode",
        lambda: npu_moe_token_unpermute(torch.zeros(8, 2), _SORTED, padded_mode=True),
        "padded_mode",
    ),
    ("unpermute-dense-probs", lambda: npu_moe_token_unpermute(torch.zeros(8, 2), _SORTED, torch.rand(4, 5)), "probs"),
    ("unpermute-1d-probs", lambda: npu_moe_token_unpermute(torch.zeros(8, 2), _SORTED, torch.rand(8)), "probs"),
    (
        "unpermute-int-probs",
        lambda: npu_moe_token_unpermute(torch.zeros(8, 2), _SORTED, torch.ones(4, 2, dtype=torch.int64)),
        "probs",
    ),
    (
        "unpermute-topk>512",
        lambda: npu_moe_token_unpermute(torch.zeros(513, 2), torch.arange(513), torch.rand(1, 513)),
        "probs",
    ),
    ("unpermute-2d-sorted", lambda: npu_moe_token_unpermute(torch.zeros(8, 2), _SORTED.view(4, 2)), "sorted_indices"),
    ("unpermute-float-sorted", lambda: npu_moe_token_unpermute(torch.zeros(8, 2), _SORTED.float()), "sorted_indices"),
    (
        "unpermute-sorted-out-of-range",
        lambda: npu_moe_token_unpermute(torch.zeros(8, 2), _SORTED + 1),
        "sorted_indices",
    ),
    ("unpermute-sorted-negative", lambda: npu_moe_token_unpermute(torch.zeros(8, 2), _SORTED - 1), "sorted_indices"),
    ("unpermute-too-many-rows", lambda: npu_moe_token_unpermute(torch.zeros(9, 2), _SORTED), "permuted_tokens"),
    ("unpermute-1d-permuted", lambda: npu_moe_token_unpermute(torch.zeros(8), _SORTED), "permuted_tokens"),
    # npu_grouped_matmul
    ("gmm-counts-short", _gmm(group_list=torch.tensor([1, 2])), "group_list"),
    ("gmm-counts-exceed", _gmm(group_list=torch.tensor([2, 3])), "group_list"),
    ("gmm-cumsum-short", _gmm(group_list=torch.tensor([1, 3]), group_list_type=0), "group_list"),
    ("gmm-cumsum-exceed", _gmm(group_list=torch.tensor([1, 5]), group_list_type=0), "group_list"),
    ("gmm-cumsum-decreasing", _gmm(group_list=torch.tensor([3, 1]), group_list_type=0), "group_list"),
    ("gmm-list-decreasing", _gmm(group_list=[3, 1], group_list_type=0), "group_list"),
    ("gmm-list-as-counts", _gmm(group_list=[1, 3], group_list_type=1), "group_list_type"),
    ("gmm-negative-count", _gmm(group_list=torch.tensor([-1, 5])), "group_list"),
    ("gmm-float-group_list", _gmm(group_list=torch.tensor([1.0, 3.0])), "group_list"),
    ("gmm-no-group_list", _gmm(group_list=None), "group_list"),
    (
        "gmm-too-many-groups",
        _gmm(
            x=[torch.zeros(1025, 1)], weight=[torch.zeros(1025, 1, 1)], group_list=torch.ones(1025, dtype=torch.int64)
        ),
        "group_list",
    ),
    ("gmm-E-mismatch", _gmm(weight=[torch.randn(3, 3, 5)]), "group_list"),
    ("gmm-group_type-1", _gmm(group_type=1), "group_type"),
    ("gmm-group_type-3", _gmm(group_type=3), "group_type"),
    ("gmm-group_list_type-2", _gmm(group_list_type=2), "group_list_type"),
    ("gmm-split_item-0", _gmm(split_item=0), "split_item"),
    ("gmm-split_item-1-k-axis", _gmm(x=[_X.T], weight=[torch.randn(4, 5)], group_type=2, split_item=1), "split_item"),
    (
        "gmm-x-last-dim-65536",
        _gmm(x=[torch.zeros(1, 65536).half()], weight=[torch.zeros(1, 65536, 1).half()], group_list=torch.tensor([1])),
        "x[0]",
    ),
    (
        "gmm-weight-last-dim-65536",
        _gmm(x=[torch.zeros(1, 1).half()], weight=[torch.zeros(1, 1, 65536).half()], group_list=torch.tensor([1])),
        "weight[0]",
    ),
    ("gmm-two-x", _gmm(x=[_X, _X]), "x"),
    ("gmm-K-mismatch", _gmm(weight=[torch.randn(2, 4, 5)]), "weight"),
    ("gmm-dtype-mismatch", _gmm(weight=[_W.half()]), "weight"),
    ("gmm-float64", _gmm(x=[_X.double()], weight=[_W.double()]), "x[0]"),
    ("gmm-bias-k-axis", _gmm(x=[_X.T], weight=[torch.randn(4, 5)], group_type=2, bias=[torch.zeros(2, 5)]), "bias"),
    (
        "gmm-bias-dtype-bf16",
        _gmm(x=[_X.bfloat16()], weight=[_W.bfloat16()], bias=[torch.zeros(2, 5).bfloat16()]),
        "bias",
    ),
    ("gmm-bias-shape", _gmm(bias=[torch.zeros(5)]), "bias"),
    ("gmm-unsupported-scale", _gmm(scale=[torch.ones(5)]), "scale"),
    ("gmm-unsupported-output_dtype", _gmm(output_dtype=torch.float16), "output_dtype"),
    (
        "gmm-ungrouped-bias-count",
        lambda: npu_grouped_matmul(
            [_X.half()] * 2, [torch.randn(3, 5).half()] * 2, bias=[torch.zeros(5).half()], group_type=-1
        ),
        "bias",
    ),
    ("gmm-x-not-list", _gmm(x=_X), "x"),
    # npu_swiglu
    ("swiglu-odd-dim", lambda: npu_swiglu(torch.randn(2, 3)), "dim"),
    ("swiglu-odd-other-dim", lambda: npu_swiglu(torch.randn(3, 2), dim=0), "dim"),
    ("swiglu-empty", lambda: npu_swiglu(torch.randn(0, 4)), "x"),
    ("swiglu-non-contiguous", lambda: npu_swiglu(torch.randn(4, 6).T), "x"),
    ("swiglu-9-dims", lambda: npu_swiglu(torch.randn([1] * 8 + [2])), "x"),
    ("swiglu-int", lambda: npu_swiglu(torch.ones(2, 2, dtype=torch.int64)), "x"),
    ("swiglu-dim-out-of-range", lambda: npu_swiglu(torch.randn(2, 2), dim=2), "dim"),
]


@pytest.mark.parametrize(("call", "argument"), [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS])
def test_rejections_raise_one_line_value_error_naming_the_argument(call: Callable[[], object], argument: str) -> None:
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    assert f"'{argument}'" in message, message


# ----------------------------------------------------------------------------------------------------------------
# per-release rules (docs/torch-npu-ops.md, 'Release rules')
# ----------------------------------------------------------------------------------------------------------------


def _fp32_gmm() -> list[Tensor]:
    x, weight = torch.randn(4, 3), torch.randn(2, 3, 5)
    return npu_grouped_matmul(
        [x], [weight], group_list=torch.tensor([1, 3]), split_item=2, group_type=0, group_list_type=1
    )


def test_default_rules_are_the_newest_documented_release() -> None:
    newest = max(RULES, key=lambda v: tuple(int(p) for p in v.split(".")))
    assert DEFAULT_RULES == newest == "7.0"
    assert current_rules() is RULES["7.0"]
    assert torch.float32 in current_rules().gmm_dtypes


def test_float32_x_rejected_under_6_0_rules() -> None:
    with emulated_torch_npu(version="6.0") as torch_npu:
        assert current_rules().version == "6.0"
        with pytest.raises(ValueError) as info:
            torch_npu.npu_grouped_matmul(
                [torch.randn(4, 3)],
                [torch.randn(2, 3, 5)],
                group_list=torch.tensor([1, 3]),
                split_item=2,
                group_type=0,
                group_list_type=1,
            )
    message = str(info.value)
    assert "\n" not in message and "'x[0]'" in message and "6.0" in message, message
    assert current_rules() is RULES[DEFAULT_RULES]  # restored on exit


@pytest.mark.parametrize("version", ["7.0", "7.0.0", "7.1", "7.2.RC1"])
def test_float32_x_accepted_under_7_x_rules(version: str) -> None:
    with emulated_torch_npu(version=version):
        assert current_rules() is RULES["7.0"]
        (y,) = _fp32_gmm()
    assert y.dtype == torch.float32 and y.shape == (4, 5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_6_0_rules_accept_half_precision(dtype: torch.dtype) -> None:
    x, weight = torch.randn(4, 3).to(dtype), torch.randn(2, 3, 5).to(dtype)
    with torch_npu_rules("6.0.0"):
        (y,) = npu_grouped_matmul([x], [weight], group_list=[1, 4], split_item=2, group_type=0)
    assert y.dtype == dtype


def test_6_0_rules_also_apply_to_the_autograd_wrapper_and_other_ops_are_unchanged() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    with torch_npu_rules("6.0"), pytest.raises(ValueError, match="'x\\[0\\]'"):
        grouped_matmul_autograd(x, torch.randn(2, 3, 5), [1, 3])
    with torch_npu_rules("6.0"):  # only npu_grouped_matmul's dtypes differ between the documented releases
        permuted, sorted_indices = npu_moe_token_permute(HAND_TOKENS, HAND_INDICES)
        npu_moe_token_unpermute(npu_swiglu(torch.cat([permuted, permuted], dim=1)), sorted_indices, torch.ones(4, 2))


def test_environment_variable_selects_the_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RULES_ENV, "6.0")
    assert current_rules() is RULES["6.0"]
    with pytest.raises(ValueError, match="torch_npu 6.0"):
        _fp32_gmm()
    with emulated_torch_npu(version="7.0"):  # an explicit version wins over the environment
        _fp32_gmm()
    monkeypatch.setenv(RULES_ENV, "7.1")
    _fp32_gmm()


def test_nesting_restores_the_outer_rules() -> None:
    with torch_npu_rules("6.0"):
        with emulated_torch_npu(version="7.0"):
            _fp32_gmm()
        with emulated_torch_npu():  # no version: keeps the rules in force
            assert current_rules().version == "6.0"
        assert current_rules().version == "6.0"
    assert current_rules().version == DEFAULT_RULES


@pytest.mark.parametrize("version", ["5.0", "abc", ""])
def test_unknown_release_is_rejected_before_installing(version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    with pytest.raises(ValueError), emulated_torch_npu(version=version):
        pass
    assert "torch_npu" not in sys.modules
    assert current_rules() is RULES[DEFAULT_RULES]


def test_bad_environment_variable_names_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RULES_ENV, "4.1")
    with pytest.raises(ValueError, match=RULES_ENV):
        current_rules()
    with pytest.raises(ValueError, match=RULES_ENV):
        _fp32_gmm()
    assert resolve_rules("6.0.rc3") is RULES["6.0"]  # an explicit release does not read the variable


# ----------------------------------------------------------------------------------------------------------------
# the torch_npu stand-in
# ----------------------------------------------------------------------------------------------------------------


def _assert_emulator_installed() -> ModuleType:
    module = sys.modules["torch_npu"]
    assert is_emulator(module) and module.__moeconf_emulator__ is True
    for name in EMULATED_OPS:
        assert getattr(module, name) is getattr(emulator, name)
    return module


def test_context_installs_and_removes_when_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    with emulated_torch_npu() as module:
        assert _assert_emulator_installed() is module
        assert importlib.util.find_spec("torch_npu") is not None
    assert "torch_npu" not in sys.modules


def test_context_hides_and_restores_a_real_torch_npu(monkeypatch: pytest.MonkeyPatch) -> None:
    real, real_sub = ModuleType("torch_npu"), ModuleType("torch_npu.npu")
    monkeypatch.setitem(sys.modules, "torch_npu", real)
    monkeypatch.setitem(sys.modules, "torch_npu.npu", real_sub)
    with emulated_torch_npu():
        _assert_emulator_installed()
        assert "torch_npu.npu" not in sys.modules
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module("torch_npu.npu")
    assert sys.modules["torch_npu"] is real and sys.modules["torch_npu.npu"] is real_sub


def test_context_restores_on_error_and_nests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    with pytest.raises(KeyError), emulated_torch_npu():
        raise KeyError("boom")
    assert "torch_npu" not in sys.modules
    with emulated_torch_npu():
        with emulated_torch_npu():
            _assert_emulator_installed()
        _assert_emulator_installed()  # the inner exit restores the outer emulator
    assert "torch_npu" not in sys.modules


def test_third_party_code_runs_unchanged(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "third_party_npu_moe_for_moeconf_test"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import torch_npu
            from torch_npu import npu_swiglu


            def moe(tokens, indices, probs, weight, counts):
                permuted, sorted_indices = torch_npu.npu_moe_token_permute(tokens, indices)
                hidden = torch_npu.npu_grouped_matmul(
                    [permuted], [weight], group_list=counts, split_item=2, group_type=0, group_list_type=1
                )[0]
                return torch_npu.npu_moe_token_unpermute(npu_swiglu(hidden), sorted_indices, probs)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    tokens, probs = torch.randn(3, 4), torch.rand(3, 2)
    indices = torch.tensor([[0, 2], [2, 1], [0, 0]], dtype=torch.int32)
    weight, counts = torch.randn(3, 4, 6), torch.tensor([3, 1, 2])
    with emulated_torch_npu():
        module = importlib.import_module(name)
        out = module.moe(tokens, indices, probs, weight, counts)
    sys.modules.pop(name, None)
    permuted, sorted_indices = npu_moe_token_permute(tokens, indices)
    hidden = naive_grouped_mm(permuted, weight, [3, 1, 2])
    expected = npu_moe_token_unpermute(npu_swiglu(hidden), sorted_indices, probs)
    torch.testing.assert_close(out, expected)


def test_fixture_installs_emulator(torch_npu_emulator: ModuleType) -> None:  # noqa: F811  (fixture)
    import torch_npu

    assert torch_npu is torch_npu_emulator
    _assert_emulator_installed()


def test_get_torch_npu_picks_real_module_only_for_npu(monkeypatch: pytest.MonkeyPatch) -> None:
    for device in (None, "cpu", "cuda:0", torch.device("cpu")):
        assert is_emulator(get_torch_npu(device))
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # `import torch_npu` raises ImportError
    assert is_emulator(get_torch_npu("npu:0"))
    real = ModuleType("torch_npu")
    monkeypatch.setitem(sys.modules, "torch_npu", real)
    assert get_torch_npu("npu") is real and get_torch_npu("NPU:1") is real
    assert is_emulator(get_torch_npu("cpu"))
