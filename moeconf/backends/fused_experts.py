"""Shared skeleton of backends that replace a transformers experts forward with their own kernel path.

Production frameworks patch the experts module of a transformers block (the router stays as shipped)
with a permute → grouped matmul → activation → grouped matmul → unpermute path. These backends do the
same, so the block's router, shared experts and parameter layout are the framework's and only the
experts computation is under test. They apply to the standard fused layout: ``gate_up_proj [E, 2I, H]``
(gate rows first), ``down_proj [E, H, I]``, SiLU-gated, no biases.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moeconf.backends.hf import HFBlockBackend
from moeconf.registry.entry import ArchEntry, Binding

STANDARD_LAYOUT = (
    Binding("experts.gate_up_proj", ("experts.w_gate", "experts.w_up"), "gate_up_rows"),
    Binding("experts.down_proj", ("experts.w_down",)),
)


def standard_layout_reason(entry: ArchEntry) -> str | None:
    """None when ``entry``'s experts use the standard fused SwiGLU layout, else why not."""
    experts, spec = entry.spec.experts, entry.spec
    if not entry.experts_path:
        return "no experts module to patch: the block applies its expert weights itself (JetMoE: on expert-sorted rows)"
    if spec.latent is not None:
        # The fused path returns Σ w·down(...) directly; Muse Spark's experts norm each expert's output first.
        return "experts norm each expert's output before weighting it (latent MoE post_expert_norm): no place in the fused path"
    prefixed = tuple(
        Binding(b.path.replace(entry.experts_path + ".", "experts.", 1), b.canonical, b.layout)
        for b in entry.params
        if b.path.startswith(entry.experts_path + ".")
    )
    if sorted(prefixed, key=lambda b: b.path) != sorted(STANDARD_LAYOUT, key=lambda b: b.path):
        return "experts are not in the fused gate_up_proj [E,2I,H] / down_proj [E,H,I] layout"
    if (experts.glu, experts.activation, experts.bias, experts.weight_site) != ("swiglu", "silu", False, "output"):
        return "experts are not SiLU-gated (SwiGLU) without biases, weighted at the output"
    if spec.identity_experts or entry.routing_from != "experts_call":
        return "routing does not reach the experts as (hidden, top_k_index, top_k_weights)"
    return None


class FusedExpertsBackend(HFBlockBackend):
    """An HF block whose experts module runs ``experts_forward`` instead of its own forward."""

    def __init__(self, name: str) -> None:
        super().__init__(name, "eager", patch=self._install)

    def supports(self, entry: ArchEntry, dtype: str, device: str) -> str | None:
        return (
            (device not in self.devices and f"{self.name} does not run on {device}")
            or super().supports(entry, dtype, device)
            or standard_layout_reason(entry)
        )

    def _install(self, block: nn.Module, entry: ArchEntry) -> None:
        # A block with token sets (ERNIE-4.5-VL) has one experts module per set, each in the same layout.
        for token_set in range(entry.num_token_sets):
            self._install_experts(block.get_submodule(entry.set_path(entry.experts_path, token_set)))

    def _install_experts(self, experts: nn.Module) -> None:

        def forward(
            hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *_: Any
        ) -> torch.Tensor:
            return self.experts_forward(experts.gate_up_proj, experts.down_proj, hidden, top_k_index, top_k_weights)

        experts.forward = forward

    def experts_forward(
        self,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        """``hidden [N, H]``, ``top_k_index/weights [N, k]`` → ``[N, H]``."""
        raise NotImplementedError
