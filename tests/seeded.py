"""Deliberately broken backends: each seeds one realistic MoE bug into a transformers block.

They plug in exactly as an outsider's backend would (``--backend tests.seeded:NAME``), so the tests
also exercise the public extension point. ``SEEDED`` maps each to the checks that must go red.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from moeconf.backends import HFBlockBackend, Observation, RunRequest
from moeconf.hf.block import Recording
from moeconf.registry import ArchEntry


def _replace_router_output(block: nn.Module, entry: ArchEntry, fn: Any) -> None:
    """Forward hook on the router whose return value replaces the router's output."""
    block.get_submodule(entry.router_path).register_forward_hook(lambda _m, _a, out: fn(*out))


# --- routing_weights: renormalisation flipped off (Mixtral renormalises always) -------------------
def _no_renorm(block: nn.Module, entry: ArchEntry) -> None:
    _replace_router_output(
        block, entry, lambda logits, w, i: (logits, torch.softmax(logits.float(), -1).gather(1, i), i)
    )


renorm_flipped = HFBlockBackend("renorm-flipped", patch=_no_renorm)


# --- output: gate and up halves of the fused projection swapped ----------------------------------
def _swap_gate_up(block: nn.Module, entry: ArchEntry) -> None:
    with torch.no_grad():
        gate, up = block.experts.gate_up_proj.detach().clone().chunk(2, dim=1)
        block.experts.gate_up_proj.copy_(torch.cat((up, gate), dim=1))


gate_up_swapped = HFBlockBackend("gate-up-swapped", patch=_swap_gate_up)


# --- aux_loss: router records probabilities as its logits (docs/regression-cases.md #5) ----------
def _probs_as_logits(block: nn.Module, entry: ArchEntry) -> None:
    _replace_router_output(block, entry, lambda logits, w, i: (torch.softmax(logits.float(), -1), w, i))


aux_from_probs = HFBlockBackend("aux-from-probs", patch=_probs_as_logits)


# --- aux_loss: padded tokens counted in the load-balancing statistics (docs/regression-cases.md #6)
class _IgnoresPadding(HFBlockBackend):
    def run(self, request: RunRequest) -> Observation:
        return super().run(dataclasses.replace(request, attention_mask=torch.ones_like(request.attention_mask)))


aux_ignores_padding = _IgnoresPadding("aux-ignores-padding")


# --- aux_loss: the framework's router is not what the model's recorder targets ----------------------
# A fused router (same weight, same math, its own class) routes correctly, but the model's output
# recorder targets the shipped router class: it records nothing for this layer, which silently drops
# out of the model's aux loss. A hook on the router submodule would still see the right logits.
def _router_of_another_class(block: nn.Module, entry: ArchEntry) -> None:
    shipped = block.get_submodule(entry.router_path)

    class FusedRouter(nn.Module):
        forward = type(shipped).forward

        def __init__(self) -> None:
            super().__init__()
            self.__dict__.update({k: v for k, v in vars(shipped).items() if not k.startswith("_")})
            for name, param in shipped.named_parameters(recurse=False):
                self.register_parameter(name, param)  # the same tensors: parameter paths are kept

    owner, _, attr = entry.router_path.rpartition(".")
    setattr(block.get_submodule(owner) if owner else block, attr, FusedRouter())


router_not_recorded = HFBlockBackend("router-not-recorded", patch=_router_of_another_class)


# --- aux_loss: the recorded router logits replaced by uniform (zero) logits; routing untouched ------
def _uniform_recorded_logits(block: nn.Module, entry: ArchEntry) -> None:
    _replace_router_output(block, entry, lambda logits, w, i: (torch.zeros_like(logits), w, i))


recorded_logits_uniform = HFBlockBackend("recorded-logits-uniform", patch=_uniform_recorded_logits)


# --- grad_aux_loss: aux loss on detached router logits (right value, no gradient) ------------------
def _detach_recorded_logits(block: nn.Module, entry: ArchEntry) -> None:
    _replace_router_output(block, entry, lambda logits, w, i: (logits.detach(), w, i))


aux_on_detached_logits = HFBlockBackend("aux-on-detached-logits", patch=_detach_recorded_logits)


# --- grad_aux_loss: the aux loss added to the total as a re-wrapped float (its graph lost) ---------
class _AuxWithoutGraph(HFBlockBackend):
    def losses(
        self, entry: ArchEntry, rec: Recording, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        aux, z = super().losses(entry, rec, attention_mask)
        return (None if aux is None else torch.tensor(aux.item())), z


aux_without_graph = _AuxWithoutGraph("aux-without-graph")


# --- grad_router: routing weights detached from the router --------------------------------------
def _detach_weights(block: nn.Module, entry: ArchEntry) -> None:
    _replace_router_output(block, entry, lambda logits, w, i: (logits, w.detach(), i))


router_grad_detached = HFBlockBackend("router-grad-detached", patch=_detach_weights)


# --- output / grad_experts: one expert silently skipped -----------------------------------------
def _skip_expert_one(block: nn.Module, entry: ArchEntry) -> None:
    def drop(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden, index, weights = args
        return hidden, index, weights * (index != 1)

    block.get_submodule(entry.experts_path).register_forward_pre_hook(drop)


expert_skipped = HFBlockBackend("expert-skipped", patch=_skip_expert_one)


# --- routing: DeepSeek-V3 selection bias ignored / group limit ignored ---------------------------
def _zero_selection_bias(block: nn.Module, entry: ArchEntry) -> None:
    block.gate.e_score_correction_bias.zero_()


selection_bias_ignored = HFBlockBackend("selection-bias-ignored", patch=_zero_selection_bias)


def _all_groups(block: nn.Module, entry: ArchEntry) -> None:
    block.gate.topk_group = block.gate.num_group


group_limit_ignored = HFBlockBackend("group-limit-ignored", patch=_all_groups)


# --- grad_input: the block's input gradient is scaled on the way back -----------------------------
def _scale_input_grad(block: nn.Module, entry: ArchEntry) -> None:
    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        if args[0].requires_grad:
            args[0].register_hook(lambda g: g * 1.5)

    block.register_forward_pre_hook(hook)


input_grad_scaled = HFBlockBackend("input-grad-scaled", patch=_scale_input_grad)


# --- grad_experts: rows of an expert that got no token are not zero (docs/regression-cases.md #10) -
def _dirty_empty_rows(block: nn.Module, entry: ArchEntry) -> None:
    # Tiny enough to pass every tolerance; only the exact-zero rule can see it.
    block.experts.down_proj.register_hook(lambda g: g + 1e-30)


empty_expert_grad_not_zero = HFBlockBackend("empty-expert-grad-not-zero", patch=_dirty_empty_rows)


# --- output: the expert reads its down projection transposed (possible only because H ≠ I fails) --
def _transposed_down(block: nn.Module, entry: ArchEntry) -> None:
    with torch.no_grad():
        w = block.experts.down_proj
        w.copy_(w.detach().transpose(1, 2).reshape(w.shape))


down_proj_transposed = HFBlockBackend("down-proj-transposed", patch=_transposed_down)


# --- grad_shared_experts / output: shared expert gate dropped; shared grads scaled ---------------
def _shared_gate_open(block: nn.Module, entry: ArchEntry) -> None:
    block.shared_expert_gate.register_forward_hook(lambda _m, _a, out: torch.full_like(out, 30.0))


shared_gate_dropped = HFBlockBackend("shared-gate-dropped", patch=_shared_gate_open)


def _scale_shared_grad(block: nn.Module, entry: ArchEntry) -> None:
    block.shared_expert.down_proj.weight.register_hook(lambda g: g * 0.5)


shared_grad_scaled = HFBlockBackend("shared-grad-scaled", patch=_scale_shared_grad)


# bug → (architecture, checks that must go red, checks that must stay green)
SEEDED: dict[str, tuple[str, set[str], set[str]]] = {
    "renorm_flipped": ("mixtral", {"routing_weights", "output"}, {"routing"}),
    "gate_up_swapped": ("mixtral", {"output", "grad_experts"}, {"routing", "routing_weights"}),
    "aux_from_probs": ("mixtral", {"aux_loss"}, {"output", "routing"}),
    "aux_ignores_padding": ("qwen3_moe", {"aux_loss"}, {"output"}),
    "router_not_recorded": ("mixtral", {"aux_loss", "grad_aux_loss"}, {"output", "routing", "grad_router"}),
    "recorded_logits_uniform": ("qwen3_moe", {"aux_loss"}, {"output", "routing_weights", "grad_router"}),
    "aux_on_detached_logits": ("mixtral", {"grad_aux_loss"}, {"aux_loss", "output", "grad_router"}),
    "aux_without_graph": ("olmoe", {"grad_aux_loss"}, {"aux_loss", "output", "grad_router"}),
    "router_grad_detached": ("qwen3_moe", {"grad_router"}, {"output", "routing_weights"}),
    "expert_skipped": ("olmoe", {"output", "grad_experts"}, {"routing"}),
    "selection_bias_ignored": ("deepseek_v3", {"routing"}, set()),
    "group_limit_ignored": ("deepseek_v3", {"routing"}, set()),
    "input_grad_scaled": ("granitemoe", {"grad_input"}, {"output", "grad_experts", "grad_router"}),
    "empty_expert_grad_not_zero": ("mixtral", {"grad_experts"}, {"output", "grad_router"}),
    "down_proj_transposed": ("qwen3_moe", {"output", "grad_experts"}, {"routing"}),
    "shared_gate_dropped": ("qwen2_moe", {"output", "grad_shared_experts"}, {"routing"}),
    "shared_grad_scaled": ("qwen2_moe", {"grad_shared_experts"}, {"output", "grad_experts"}),
}
