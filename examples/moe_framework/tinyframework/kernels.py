"""The framework's grouped-matmul experts path, in plain torch (a real framework calls its kernel).

The fused SwiGLU layout transformers uses: ``gate_up_proj [E, 2I, H]`` (gate rows first),
``down_proj [E, H, I]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_experts(
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    permute_weights: bool = True,
) -> torch.Tensor:
    """``hidden [N, H]``, ``top_k_index/weights [N, k]`` → ``[N, H]``.

    ``permute_weights=False`` plants a real-world bug: the routing weights stay in token order while
    the rows they scale were sorted by expert, so every row is scaled by some other slot's weight.
    """
    num_experts, k = gate_up_proj.shape[0], top_k_index.shape[1]
    slots = top_k_index.reshape(-1)
    # Permute: the (token, slot) rows grouped by expert; a stable sort keeps token order in a group.
    order = slots.argsort(stable=True)
    token = order // k
    counts = torch.bincount(slots, minlength=num_experts).tolist()
    rows = hidden[token]
    groups = []
    for e, group in enumerate(rows.split(counts)):
        # One GEMM per expert group (an empty group contributes nothing, and its weights get zero grads).
        gate, up = F.linear(group, gate_up_proj[e]).chunk(2, dim=-1)
        groups.append(F.linear(F.silu(gate) * up, down_proj[e]))
    out_rows = torch.cat(groups)
    weights = top_k_weights.reshape(-1)
    weights = weights[order] if permute_weights else weights
    # Unpermute: scale each row by its routing weight and add it back to its token.
    scaled = out_rows * weights.to(out_rows.dtype)[:, None]
    return torch.zeros_like(hidden).index_add(0, token, scaled)
