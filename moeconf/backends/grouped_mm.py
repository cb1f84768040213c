"""``grouped-mm``: the experts on ``torch._grouped_mm`` (CPU and CUDA), structured like the reference
dispatch: stable sort by expert, grouped matmul, SwiGLU, grouped matmul, weighted scatter back.

It is the fast reference-structured path and the baseline of the performance suite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeconf.backends.fused_experts import FusedExpertsBackend
from moeconf.registry.entry import ArchEntry


class TorchGroupedMMBackend(FusedExpertsBackend):
    devices = ("cpu", "cuda")
    dtypes = ("fp32", "bf16")

    def supports(self, entry: ArchEntry, dtype: str, device: str) -> str | None:
        if device == "cuda" and dtype != "bf16":
            return "torch._grouped_mm on CUDA takes bf16 only"
        return super().supports(entry, dtype, device)

    def experts_forward(self, gate_up_proj, down_proj, hidden, top_k_index, top_k_weights):  # type: ignore[no-untyped-def]
        n, k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # rows grouped by expert, ties in (token, slot) order
        counts = torch.bincount(flat, minlength=gate_up_proj.shape[0])
        offsets = torch.cumsum(counts, 0).to(torch.int32)  # grouped_mm takes cumulative row ends
        rows = hidden[order // k]
        gate, up = torch._grouped_mm(rows, gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        down = torch._grouped_mm(F.silu(gate) * up, down_proj.transpose(1, 2), offs=offsets)
        weights = top_k_weights.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros(n, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        # NOTE: accumulate in fp32 then cast once: a bf16 index_add would round at every slot.
        return out.index_add(0, order // k, down.float() * weights.float()).to(hidden.dtype)


GROUPED_MM = TorchGroupedMMBackend("grouped-mm")
