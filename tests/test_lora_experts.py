"""moeconf.integration.lora: LoRA on expert projections (PEFT ``target_parameters``), audited against the
reference. Correct PEFT is green; each seeded bug turns its checks red."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

from moeconf.integration import LORA_CHECKS, AuditResult, audit_lora_experts, peft_apply_lora
from moeconf.integration.lora import expert_factors

GREEN_ARCHS = ["qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"]  # qwen2_moe, deepseek_v3: shared experts


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def by_check(results: list[AuditResult]) -> dict[str, AuditResult]:
    return {r.check: r for r in results}


def _wrappers(adapted: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora.layer import ParamWrapper

    return [m for m in adapted.modules() if isinstance(m, ParamWrapper)]


# --- seeded bugs ---------------------------------------------------------------------------------------


def lora_detached(block: nn.Module, paths: list[str], rank: int) -> nn.Module:
    """Seeded bug: the adapter's delta enters the forward detached (``ΔW.detach()``): the output is
    right, the adapters never receive a gradient."""
    adapted = peft_apply_lora(block, paths, rank)
    for w in _wrappers(adapted):
        inner = w.get_delta_factors
        w.get_delta_factors = lambda name, inner=inner: tuple(
            t.detach() if isinstance(t, torch.Tensor) else t for t in inner(name)
        )
    return adapted


def lora_gate_up_only(block: nn.Module, paths: list[str], rank: int) -> nn.Module:
    """Seeded bug: adapters on ``gate_up_proj`` only (a target list written for one layout)."""
    return peft_apply_lora(block, [p for p in paths if p.endswith("gate_up_proj")], rank)


def lora_disabled(block: nn.Module, paths: list[str], rank: int) -> nn.Module:
    """Seeded bug: adapters attached but switched off in the forward (``disable_adapter_layers``)."""
    adapted = peft_apply_lora(block, paths, rank)
    adapted.disable_adapter_layers()
    return adapted


def lora_decay_in_backward(block: nn.Module, paths: list[str], rank: int) -> nn.Module:
    """Seeded bug: weight decay folded into the adapter's gradient by a hook (every row, idle experts
    included: their slices get dirty gradients, cf. the expert rows of PR #48205)."""
    adapted = peft_apply_lora(block, paths, rank)
    for w in _wrappers(adapted):
        weight = w.lora_A["default"].weight
        weight.register_hook(lambda g, weight=weight: g + 1e-3 * weight.detach())
    return adapted


def _merge_skipping(expert: int):
    def merge(adapted: nn.Module) -> nn.Module:
        """Seeded bug: a hand-written merge that folds every expert's ΔW but one."""
        with torch.no_grad():
            for w in _wrappers(adapted):
                delta = w.get_delta_weight("default")
                delta[expert] = 0
                w.get_param().add_(delta)
        return adapted.unload()

    return merge


merge_skips_idle_expert = _merge_skipping(-1)
merge_skips_expert_0 = _merge_skipping(0)


def merge_contiguous_b(adapted: nn.Module) -> nn.Module:
    """Seeded bug: a merge that assumes expert e owns *contiguous* columns of lora_B (PEFT's are strided)."""
    with torch.no_grad():
        for w in _wrappers(adapted):
            a = w.lora_A["default"].weight
            b = w.lora_B["default"].weight
            e = w.num_experts
            a_e = a.reshape(e, -1, a.shape[-1])
            b_e = b.reshape(b.shape[0], e, -1).permute(1, 0, 2)  # wrong: [out, E, r]
            delta = w.scaling["default"] * (b_e @ a_e)
            param = w.get_param()
            w.get_param().add_(delta if delta.shape == param.shape else delta.transpose(-1, -2))
    return adapted.unload()


# --- tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", GREEN_ARCHS)
def test_peft_lora_on_experts_is_green(arch: str) -> None:
    results = audit_lora_experts(arch)
    assert [r.check for r in results] == list(LORA_CHECKS)
    assert all(r.status == "pass" for r in results), [(r.check, r.message) for r in results if r.status != "pass"]
    table = by_check(results)
    assert "idle experts [7]" in table["lora_grad_idle"].message


def test_router_adapter_is_green() -> None:
    results = audit_lora_experts("qwen3_moe", target="experts+router")
    assert all(r.status == "pass" for r in results), [(r.check, r.message) for r in results if r.status != "pass"]
    assert "gate.weight" in by_check(results)["lora_targets"].message


def test_detached_adapter_is_red() -> None:
    table = by_check(audit_lora_experts("qwen3_moe", apply_lora=lora_detached))
    assert table["lora_forward"].status == "pass"  # the output alone cannot see it
    assert table["lora_grad_routed"].status == "fail"
    assert "no gradient (None)" in table["lora_grad_routed"].message
    assert table["lora_grad_reference"].status == "fail"
    assert table["lora_grad_idle"].status == "fail"  # None is not exact zeros


@pytest.mark.parametrize(
    "apply_lora, red, words",
    [
        (lora_gate_up_only, {"lora_targets"}, "no LoRA adapter on experts.down_proj"),
        (lora_disabled, {"lora_forward", "lora_grad_routed", "lora_grad_idle", "lora_grad_reference"}, "output"),
        (lora_decay_in_backward, {"lora_grad_idle", "lora_grad_reference"}, "expert 7, no token"),
    ],
)
def test_bad_adapter_is_red(apply_lora, red: set[str], words: str) -> None:
    table = by_check(audit_lora_experts("qwen2_moe", apply_lora=apply_lora))
    assert {c for c, r in table.items() if r.status == "fail"} == red, {c: r.message for c, r in table.items()}
    assert any(words in table[c].message for c in red)


@pytest.mark.parametrize(
    "merge_fn, words, output_red",
    [
        (merge_skips_idle_expert, "[expert 7]", False),  # invisible in this batch's output
        (merge_skips_expert_0, "[expert 0]", True),
        (merge_contiguous_b, "merged experts.", True),
    ],
)
def test_bad_merge_is_red(merge_fn, words: str, output_red: bool) -> None:
    table = by_check(audit_lora_experts("mixtral", merge_fn=merge_fn))
    merge = table["lora_merge"]
    assert merge.status == "fail"
    assert words in merge.message
    assert ("merged block output" in merge.message) == output_red
    assert all(table[c].status == "pass" for c in LORA_CHECKS if c != "lora_merge")


def test_flat_expert_stack_is_skipped_with_reason() -> None:
    results = audit_lora_experts("dbrx")
    assert {r.status for r in results} == {"skip"}
    assert "shared by all experts" in results[0].message


def test_peft_layout_per_expert_factors() -> None:
    """PEFT's 3-D adapter: expert e owns rows e·r.. of lora_A and the strided columns e::E of lora_B."""
    e, r, i, o = 3, 2, 5, 4
    a = torch.arange(e * r * i, dtype=torch.float64).reshape(e * r, i)
    b = torch.arange(o * r * e, dtype=torch.float64).reshape(o, r * e)
    a_e, b_e = expert_factors(a, b, e)
    assert torch.equal(a_e[1], a[r : 2 * r])
    assert torch.equal(b_e[1], b[:, 1::e])
