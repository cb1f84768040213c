"""The framework's own MoE block for Mixtral-style configs (softmax → top-k → renormalise, SwiGLU
experts), as a framework or a remote-code model ships it: not a transformers class, so moeconf only
knows it through the entry in ``tinyframework.moe``.

moeconf finds in this module what the entry points it at: the block class, and the model's loss
function (``load_balancing_loss_func``), which it calls on the router logits the block produced.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter, load_balancing_loss_func

from tinyframework.kernels import grouped_experts


class TinyRouter(MixtralTopKRouter):
    """The framework's router. A ``MixtralTopKRouter`` by class, because that is what a Mixtral
    model's output recorder collects as ``router_logits`` (its output 0): a router of any other class
    would silently drop out of the model's aux loss (moeconf's ``aux_loss`` check says so)."""

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(hidden, self.weight)
        # The softmax in fp32 even in a bf16 model: routing decided on rounded scores flips experts.
        weights, index = logits.float().softmax(-1).topk(self.top_k, dim=-1)
        return logits, weights / weights.sum(-1, keepdim=True), index


class TinyExperts(nn.Module):
    """Every expert's weights in two tensors, for the grouped GEMMs (no per-expert modules)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        experts, hidden, inter = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, inter))

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return grouped_experts(self.gate_up_proj, self.down_proj, hidden, top_k_index, top_k_weights)


class TinyMoeBlock(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.gate = TinyRouter(config)
        self.experts = TinyExperts(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        flat = hidden.reshape(-1, shape[-1])
        _, weights, index = self.gate(flat)
        return self.experts(flat, index, weights).reshape(shape)


__all__ = ["TinyExperts", "TinyMoeBlock", "TinyRouter", "load_balancing_loss_func"]
