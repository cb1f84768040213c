"""Seeded bugs in the NPU grouped-matmul path (docs/regression-cases.md #8, #9, #10).

Each subclasses the ``npu-gmm`` backend and breaks one step, as a framework patch would.
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import torch

from moeconf.backends.npu_gmm import NpuGmmBackend
from moeconf.npu import grouped_matmul_autograd


class DenseProbs(NpuGmmBackend):
    """verl PR #4888: dense ``[T, E]`` routing weights passed to unpermute instead of top-k ``[T, K]``."""

    def experts_forward(self, gate_up_proj, down_proj, hidden, top_k_index, top_k_weights):  # type: ignore[no-untyped-def]
        dense = torch.zeros(hidden.shape[0], gate_up_proj.shape[0], dtype=top_k_weights.dtype).scatter(
            1, top_k_index, top_k_weights
        )
        ops = self.ops(hidden.device)
        permuted, sorted_indices = self.permute(ops, hidden, top_k_index)
        rows = self.expert_mlp(
            ops, permuted, self.group_list(top_k_index, gate_up_proj.shape[0]), gate_up_proj, down_proj
        )
        return self.unpermute(ops, rows, sorted_indices, dense)


class CountsAsCumulative(NpuGmmBackend):
    """Per-expert counts handed to a grouped matmul that expects cumulative offsets (group_list_type=0)."""

    def expert_mlp(self, ops, rows, counts, gate_up_proj, down_proj):  # type: ignore[no-untyped-def]
        gmm = lambda x, w: ops.npu_grouped_matmul(
            [x], [w], group_list=counts, split_item=2, group_type=0, group_list_type=0
        )[0]
        return gmm(ops.npu_swiglu(gmm(rows, gate_up_proj.transpose(1, 2)), dim=-1), down_proj.transpose(1, 2))


class GateUpSwapped(NpuGmmBackend):
    """v5 ``[E, 2I, H]`` read as up-then-gate: the halves fed to swiglu in the wrong order."""

    def expert_mlp(self, ops, rows, counts, gate_up_proj, down_proj):  # type: ignore[no-untyped-def]
        gate, up = grouped_matmul_autograd(rows, gate_up_proj.transpose(1, 2), counts, ops=ops).chunk(2, dim=-1)
        swapped = torch.cat((up, gate), dim=-1)
        return grouped_matmul_autograd(ops.npu_swiglu(swapped, dim=-1), down_proj.transpose(1, 2), counts, ops=ops)


class EmptyGroupGarbage(NpuGmmBackend):
    """transformers PR #48205: the weight-gradient blocks of zero-row groups left uninitialised."""

    def ops(self, device: torch.device) -> ModuleType:
        real = super().ops(device)

        def npu_grouped_matmul(x, weight, *, group_list=None, group_type=None, **kwargs):  # type: ignore[no-untyped-def]
            out = real.npu_grouped_matmul(x, weight, group_list=group_list, group_type=group_type, **kwargs)
            if group_type == 2:  # [E, K, N] weight grads: what torch.empty would have left there
                empty = torch.as_tensor(group_list).reshape(-1) == 0
                out[0][empty] = 1e-3
            return out

        ops = {name: getattr(real, name) for name in dir(real) if name.startswith("npu_")}
        return SimpleNamespace(**{**ops, "npu_grouped_matmul": npu_grouped_matmul})  # type: ignore[return-value]


dense_probs = DenseProbs("npu-dense-probs")
counts_as_cumulative = CountsAsCumulative("npu-counts-as-cumulative")
gate_up_swapped = GateUpSwapped("npu-gate-up-swapped")
empty_group_garbage = EmptyGroupGarbage("npu-empty-group-garbage")

# bug → checks that must go red (fail or error), on qwen3_moe
SEEDED_NPU: dict[str, set[str]] = {
    "dense_probs": {"output"},
    "counts_as_cumulative": {"output"},
    "gate_up_swapped": {"output", "grad_experts"},
    "empty_group_garbage": {"grad_experts"},
}
