"""Devices and dtypes by the names used on the command line."""

from __future__ import annotations

import importlib.util

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICES = ("cpu", "cuda", "npu")


def device_available(device: str) -> bool:
    """Whether ``device`` can run here (NPU needs ``torch_npu`` and a visible Ascend device)."""
    if device == "cpu":
        return True
    if device == "cuda":
        return torch.cuda.is_available()
    if device == "npu":
        if importlib.util.find_spec("torch_npu") is None:
            return False
        import torch_npu  # noqa: F401  (registers torch.npu)

        return bool(getattr(torch, "npu", None)) and torch.npu.is_available()
    return False
