"""A framework's NPU kernel, outside moeconf: what the emulator's rejections must point at.

Each function makes one torch_npu call; ``LINES`` names the line of each call (found, not hard-coded, so that
editing this file cannot make the test lie).
"""

from __future__ import annotations

import re

import torch

from moeconf.backends.npu_gmm import NpuGmmBackend
from moeconf.npu import grouped_matmul_autograd, torch_npu_rules
from moeconf.npu.fake_torch_npu import emulator_module

torch_npu = emulator_module()


def swiglu_on_a_transposed_view(x: torch.Tensor) -> torch.Tensor:
    return torch_npu.npu_swiglu(x.T, dim=-1)  # CALL: swiglu


def permute_with_float_ids(hidden: torch.Tensor, top_k_index: torch.Tensor) -> object:
    return torch_npu.npu_moe_token_permute(hidden, top_k_index.float())  # CALL: permute


def grouped_matmul_with_wrong_counts(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return grouped_matmul_autograd(x, weight, [1, x.size(0) - 2])  # CALL: gmm


def fp32_grouped_matmul_backward_under_6_0_rules(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    y = grouped_matmul_autograd(x, weight, [1, x.size(0) - 1])  # CALL: gmm-forward
    with torch_npu_rules("6.0"):  # the backward's grouped matmuls then reject float32
        y.sum().backward()  # CALL: backward
    return y


class MyKernel(NpuGmmBackend):
    """A framework's NPU experts kernel (``--backend tests.npu.outside_caller:MY_KERNEL``) that feeds
    ``npu_swiglu`` a transposed, non-contiguous view: every case raises at the same line of this file."""

    def expert_mlp(self, ops, rows, counts, gate_up_proj, down_proj):  # type: ignore[no-untyped-def]
        gate_up = grouped_matmul_autograd(rows, gate_up_proj.transpose(1, 2), counts, ops=ops)
        act = ops.npu_swiglu(gate_up.T, dim=0)  # CALL: kernel
        return grouped_matmul_autograd(act.T, down_proj.transpose(1, 2), counts, ops=ops)


MY_KERNEL = MyKernel("my-kernel")


def _call_lines() -> dict[str, int]:
    with open(__file__, encoding="utf-8") as f:
        found = (re.search(r"# CALL: ([\w-]+)$", line.rstrip()) for line in f)
        return {m.group(1): number for number, m in enumerate(found, 1) if m}


LINES = _call_lines()
