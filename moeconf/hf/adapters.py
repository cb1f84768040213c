"""Block adapters: the MoE block of architectures whose router and experts are not one module.

An adapter wraps the module transformers builds (``ArchEntry.block_class``) and shares its submodules: the
parameters it exposes are the layer's own, and a framework patch of the layer's router or experts is what
the adapter runs. Only the composition that the layer's ``forward`` spells out around them is written here,
line for line, and ``tests/test_gemma4_family.py`` checks it against the real layer's ``forward``.
"""

from __future__ import annotations

import torch
from torch import nn


class Gemma4MoEBranch(nn.Module):
    """The MoE branch of a Gemma 4 decoder layer (``Gemma4TextDecoderLayer``, DiffusionGemma's encoder and
    decoder text layers): ``[B, S, H] → [B, S, H]``.

    In the layer (``models/gemma4/modeling_gemma4.py:1391-1403``; ``models/diffusion_gemma/modeling_diffusion_gemma.py:643-653``,
    ``:722-732``)
    the branch takes the residual stream ``x`` before the feed-forward norms; the router reads ``x`` itself,
    the experts ``pre_feedforward_layernorm_2(x)``, and the experts' weighted sum goes through
    ``post_feedforward_layernorm_2``. The layer then adds the dense MLP branch and applies
    ``post_feedforward_layernorm`` to the sum: that part is the dense MLP's, outside the MoE block.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        # NOTE: the layer's own modules, not copies: bindings, hooks and patches act on the real ones.
        self.router = layer.router
        self.experts = layer.experts
        self.pre_feedforward_layernorm_2 = layer.pre_feedforward_layernorm_2
        self.post_feedforward_layernorm_2 = layer.post_feedforward_layernorm_2

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states [B, S, H]`` (the layer's residual before its feed-forward) → the branch's ``[B, S, H]``."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, top_k_weights, top_k_index = self.router(flat)
        routed = self.experts(self.pre_feedforward_layernorm_2(flat), top_k_index, top_k_weights)
        return self.post_feedforward_layernorm_2(routed.reshape(hidden_states.shape))
