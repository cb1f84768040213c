"""Configuration audit: ZeRO-3 leaf keys and aux-loss composition (docs/regression-cases.md #3, #4, #7)."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator

import pytest
import torch

from moeconf.registry import get_entry
from moeconf.registry.core import CORE_ENTRIES
from moeconf.tools import audit

pytest.importorskip("deepspeed")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread avoids OpenMP hand-off stalls on a loaded 2-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def by_check(results: list[audit.AuditResult]) -> dict[str, audit.AuditResult]:
    return {r.check: r for r in results}


@pytest.mark.parametrize("entry", CORE_ENTRIES, ids=lambda e: e.model_type)
def test_core_entries_pass_the_audit(entry) -> None:  # type: ignore[no-untyped-def]
    results = by_check(audit.audit_entry(entry))
    assert set(results) == {"config_leaf", "config_aux_loss"}
    assert results["config_leaf"].status == "pass", results["config_leaf"].message
    expected_aux = "pass" if entry.aux_coef_attr else "warn"  # deepseek_v3 / llama4 carry unused knobs
    assert results["config_aux_loss"].status == expected_aux, results["config_aux_loss"].message
    assert all(r.repro == f"moeconf check --arch {entry.model_type} --check config" for r in results.values())


def test_typo_in_leaf_key_fails() -> None:
    # LLaMA-Factory #6669: "qwen2moe" registered nothing, ZeRO-3 hung.
    typo = dataclasses.replace(get_entry("qwen2_moe"), leaf_classes=("Qwen2MoESparseMoeBlock",))
    result = audit.audit_leaf(typo)
    assert result.status == "fail" and "Qwen2MoESparseMoeBlock" in result.message


def test_leaf_class_defined_but_absent_from_model_fails() -> None:
    # A real class of the module that the tiny model never instantiates marks nothing.
    absent = dataclasses.replace(get_entry("mixtral"), leaf_classes=("MixtralForQuestionAnswering",))
    result = audit.audit_leaf(absent)
    assert result.status == "fail" and "no module of class" in result.message


def test_leaf_matching_by_name_catches_same_named_class() -> None:
    # LLaMA-Factory #7800: remote code builds a same-named class that is not the transformers class.
    from deepspeed.utils import set_z3_leaf_modules, z3_leaf_module

    entry = get_entry("mixtral")
    model = audit.build_model(entry, device="meta")
    block = model.get_submodule(entry.block_path)
    original = type(block)
    block.__class__ = audit.impostor_class(original)
    assert type(block).__name__ == original.__name__ and not isinstance(block, original)
    assert set_z3_leaf_modules(model, [original], raise_if_not_found=False) == []  # by object: missed
    classes = audit.leaf_classes_by_name(model, [original.__name__])
    assert classes == [type(block)]
    marked = set_z3_leaf_modules(model, classes)
    assert marked == [block] and z3_leaf_module(block)


def test_coefficient_at_an_attribute_the_model_never_reads_fails() -> None:
    ignored = dataclasses.replace(get_entry("mixtral"), aux_coef_attr="router_z_loss_coef")
    result = audit.audit_aux_loss(ignored)
    assert result.status == "fail" and "set but ignored" in result.message
    assert "0.02" in result.message  # the coefficient the model really used (the config's own)


def test_aux_never_added_to_the_loss_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    cls = transformers.MixtralForCausalLM
    real_forward = cls.forward

    def forward_without_aux(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = real_forward(self, *args, **kwargs)
        if out.loss is not None and out.aux_loss is not None:
            out.loss = out.loss - self.router_aux_loss_coef * out.aux_loss  # computed, never added
        return out

    monkeypatch.setattr(cls, "forward", forward_without_aux)
    result = audit.audit_aux_loss(get_entry("mixtral"))
    assert result.status == "fail" and "not router_aux_loss_coef=0.37 (set but ignored)" in result.message


def test_no_router_logits_means_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    # output_router_logits left off (the config default): no aux_loss is reported at all.
    monkeypatch.setattr(audit, "enable_router_logits", lambda config: [])
    entry = get_entry("mixtral")
    off = dataclasses.replace(entry, config_kwargs={**entry.config_kwargs, "output_router_logits": False})
    result = audit.audit_aux_loss(off)
    assert result.status == "fail" and "silently ignored" in result.message


@pytest.mark.parametrize("model_type", ["deepseek_v3", "llama4"])
def test_unused_coefficient_warns(model_type: str) -> None:
    result = audit.audit_aux_loss(get_entry(model_type))
    assert result.status == "warn"
    assert "coefficient set but the model computes no aux loss: it would be silently ignored" in result.message


def test_skip_without_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.setitem(sys.modules, "deepspeed.utils", None)
    result = audit.audit_leaf(get_entry("mixtral"))
    assert result.status == "skip" and "deepspeed" in result.message


def test_main_audit_records(capsys: pytest.CaptureFixture[str]) -> None:
    assert audit.main_audit(["mixtral", "deepseek_v3"], "json") == 0
    report = json.loads(capsys.readouterr().out)
    records = report["results"]
    assert {(r["arch"], r["check"]) for r in records} == {
        (a, c) for a in ("mixtral", "deepseek_v3") for c in ("config_leaf", "config_aux_loss")
    }
    assert all(r["backend"] == "config" and r["case"] == "tiny-model" and r["dtype"] == "fp32" for r in records)
    warned = [r for r in records if r["message"].startswith("WARNING:")]
    assert [(r["arch"], r["check"], r["status"]) for r in warned] == [("deepseek_v3", "config_aux_loss", "pass")]


def test_main_audit_fails_on_a_bad_entry(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from moeconf import registry

    bad = dataclasses.replace(get_entry("qwen2_moe"), leaf_classes=("Qwen2MoESparseMoeBlock",))
    monkeypatch.setitem(registry.REGISTRY, "qwen2_moe", bad)
    assert audit.main_audit(["qwen2_moe"], "text") == 1
    out = capsys.readouterr().out
    assert "config_leaf" in out and "moeconf check --arch qwen2_moe --check config" in out
