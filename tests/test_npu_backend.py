"""The npu-gmm and grouped-mm backends: green on the reference, red on every seeded NPU-path bug."""

from __future__ import annotations

import sys

import pytest

from moeconf.harness.engine import CheckResult, Selection, run_selection
from moeconf.npu.fake_torch_npu import get_torch_npu, is_emulator
from tests.seeded_npu import SEEDED_NPU


def run(archs: tuple[str, ...], backend: str, dtype: str = "fp32") -> list[CheckResult]:
    return [r for g in run_selection(Selection(archs=archs, backends=(backend,), dtypes=(dtype,))) for r in g]


@pytest.mark.parametrize("backend", ["npu-gmm", "grouped-mm"])
def test_grouped_backends_match_the_reference(backend: str) -> None:
    records = run(("mixtral", "qwen3_moe", "deepseek_v3", "qwen2_moe"), backend, "bf16")
    assert records and all(r.status == "pass" for r in records), [r for r in records if r.status != "pass"][:3]


def test_npu_gmm_uses_the_emulator_on_cpu_and_not_a_real_module() -> None:
    assert is_emulator(get_torch_npu("cpu"))
    assert "torch_npu" not in sys.modules or is_emulator(sys.modules["torch_npu"])


@pytest.mark.parametrize("arch,reason", [("gpt_oss", "layout"), ("llama4", "layout"), ("dbrx", "layout")])
def test_non_standard_experts_are_declared_unsupported(arch: str, reason: str) -> None:
    records = run((arch,), "npu-gmm")
    assert {r.status for r in records} == {"skip"} and reason in records[0].message


@pytest.mark.parametrize("bug", sorted(SEEDED_NPU))
def test_seeded_npu_bug_goes_red(bug: str) -> None:
    records = run(("qwen3_moe",), f"tests.seeded_npu:{bug}")
    red = {r.check for r in records if r.status in ("fail", "error")}
    assert SEEDED_NPU[bug] <= red, f"{bug}: {red}"
    if bug == "empty_group_garbage":  # caught only where an expert is empty, by the exact-zero rule
        assert any("exactly zero" in r.message for r in records if r.check == "grad_experts" and r.status == "fail")
