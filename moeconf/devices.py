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


def use_threads_for_tiny_shapes() -> None:
    """One intra-op thread unless ``MOECONF_THREADS`` says otherwise.

    NOTE: the checks run thousands of tiny matmuls; on a 2-core machine a second intra-op thread
    made ``moeconf check`` 3-5x slower (thread hand-off costs more than the op), and pytest-xdist
    workers already use the cores.
    """
    import os

    torch.set_num_threads(int(os.environ.get("MOECONF_THREADS", "1")))
