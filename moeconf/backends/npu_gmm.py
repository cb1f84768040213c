"""``npu-gmm``: the NPU MoE experts path, on real torch_npu on an Ascend device and on moeconf's exact
pure-torch emulator of the same ops everywhere else (``moeconf.npu``).

Steps, each a method so a framework (or a seeded bug) can replace one:
``npu_moe_token_permute`` → group list (counts) → ``npu_grouped_matmul`` (gate_up) → ``npu_swiglu`` →
``npu_grouped_matmul`` (down) → ``npu_moe_token_unpermute`` weighted by the top-k ``probs [N, k]``.
"""

from __future__ import annotations

from types import ModuleType

import torch

from moeconf.backends.fused_experts import FusedExpertsBackend
from moeconf.npu import grouped_matmul_autograd
from moeconf.npu.fake_torch_npu import get_torch_npu


class NpuGmmBackend(FusedExpertsBackend):
    devices = ("cpu", "npu")
    dtypes = ("fp32", "bf16")

    def ops(self, device: torch.device) -> ModuleType:
        """Real torch_npu for NPU tensors, the emulator otherwise."""
        return get_torch_npu(device)

    def permute(
        self, ops: ModuleType, hidden: torch.Tensor, top_k_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.npu_moe_token_permute(hidden, top_k_index.to(torch.int32))

    def group_list(self, top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
        """Rows per expert (group_list_type=1). NOTE: bincount on the integer ids, never histc on a
        float cast of them (ms-swift #8207: NaN grads from a wrong group list)."""
        return torch.bincount(top_k_index.reshape(-1), minlength=num_experts).to(torch.int64)

    def expert_mlp(
        self,
        ops: ModuleType,
        rows: torch.Tensor,
        counts: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
    ) -> torch.Tensor:
        # npu_grouped_matmul takes matmul-layout weights [E, K, N]: transpose the HF [E, N, K] ones.
        gate_up = grouped_matmul_autograd(rows, gate_up_proj.transpose(1, 2), counts, ops=ops)
        return grouped_matmul_autograd(ops.npu_swiglu(gate_up, dim=-1), down_proj.transpose(1, 2), counts, ops=ops)

    def unpermute(
        self, ops: ModuleType, rows: torch.Tensor, sorted_indices: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return ops.npu_moe_token_unpermute(rows, sorted_indices, probs=top_k_weights)

    def experts_forward(self, gate_up_proj, down_proj, hidden, top_k_index, top_k_weights):  # type: ignore[no-untyped-def]
        if hidden.shape[0] == 0:
            # NOTE: torch_npu's ops reject empty inputs (npu_swiglu); a block with token sets calls a set's
            # experts on zero rows (ERNIE-4.5-VL). No rows: zero output, and zero (not None) gradients
            # for every tensor that a grouped matmul over zero rows would have reached.
            touched = gate_up_proj.sum() + down_proj.sum() + top_k_weights.sum()
            return hidden.new_zeros(hidden.shape) + 0 * touched.to(hidden.dtype)
        ops = self.ops(hidden.device)
        permuted, sorted_indices = self.permute(ops, hidden, top_k_index)
        counts = self.group_list(top_k_index, gate_up_proj.shape[0])
        rows = self.expert_mlp(ops, permuted, counts, gate_up_proj, down_proj)
        return self.unpermute(ops, rows, sorted_indices, top_k_weights)


NPU_GMM = NpuGmmBackend("npu-gmm")
