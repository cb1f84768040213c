"""Multi-rank backends on accelerators: one rank per device, refused (with the count) below that;
the collective backend follows the device. No accelerator needed: the device count is faked."""

from __future__ import annotations

import pytest

from moeconf.backends import partitioned
from moeconf.backends.partitioned import ZERO3_LEAF, ranks_reason
from moeconf.distributed.torchrun import COMM_BACKENDS
from moeconf.registry import REGISTRY


@pytest.mark.parametrize(("count", "world", "refused"), [(1, 2, True), (2, 2, False), (2, 4, True), (8, 4, False)])
def test_one_rank_per_device(monkeypatch: pytest.MonkeyPatch, count: int, world: int, refused: bool) -> None:
    monkeypatch.setattr(partitioned, "device_count", lambda device: count)
    reason = ranks_reason("zero3-leaf", world, "cuda")
    assert (reason is not None) == refused
    if refused:
        assert reason == f"zero3-leaf needs {world} cuda devices (one per rank), this machine has {count}"


def test_supports_says_why_on_a_one_gpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    real = partitioned.device_count
    monkeypatch.setattr(partitioned, "device_available", lambda device: True)
    monkeypatch.setattr(partitioned, "device_count", lambda device: 1 if device == "cuda" else real(device))
    assert ZERO3_LEAF.supports(REGISTRY["mixtral"], "fp32", "cuda") == (
        "zero3-leaf needs 2 cuda devices (one per rank), this machine has 1"
    )
    assert ZERO3_LEAF.supports(REGISTRY["mixtral"], "fp32", "cpu") is None  # CPU ranks share the machine


def test_collectives_by_device() -> None:
    assert COMM_BACKENDS == {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
