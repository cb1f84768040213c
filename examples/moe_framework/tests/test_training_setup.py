"""The framework's ZeRO-3 leaf function and MoE configure function, audited by moeconf on tiny models
of the transformers architectures the framework trains."""

from __future__ import annotations

import pytest

integration = pytest.importorskip("moeconf.integration")

from tinyframework.training import configure_moe, set_zero3_leaves

ARCHS = ["mixtral", "qwen3_moe", "olmoe"]


def _failures(results: list) -> list[str]:
    return [f"{r.arch} {r.check}: {r.status}: {r.message}\n  repro: {r.repro}" for r in results if not r.ok]


@pytest.mark.cpu
def test_zero3_leaf_function_marks_each_moe_block_on_every_rank() -> None:
    pytest.importorskip("deepspeed")
    failures = _failures(integration.audit_leaf_function(set_zero3_leaves, archs=ARCHS))
    assert not failures, "\n".join(failures)


@pytest.mark.cpu
def test_configure_function_turns_the_aux_loss_on_with_the_given_coefficient() -> None:
    failures = _failures(integration.audit_configure_function(configure_moe, archs=ARCHS))
    assert not failures, "\n".join(failures)
