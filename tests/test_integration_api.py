"""moeconf.integration: a framework's own leaf and configure functions, audited. Every check goes red on
its seeded framework bug (tests/seeded_framework.py) and stays green on correct code."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from moeconf import integration
from moeconf.integration import AuditResult, audit_configure_function, audit_leaf_function
from moeconf.integration import leaf as leaf_module
from moeconf.registry import get_entry
from tests import seeded_framework as sf

pytest.importorskip("deepspeed")

ARCHS = ["mixtral", "qwen3_moe", "deepseek_v3"]
AUX_ARCHS = ["mixtral", "qwen3_moe", "olmoe", "glm4v_moe"]  # glm4v_moe: flag and coefficient in text_config


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread avoids OpenMP hand-off stalls on a loaded 2-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def table(results: list[AuditResult]) -> dict[tuple[str, str], AuditResult]:
    return {(r.arch, r.check): r for r in results}


def statuses(results: list[AuditResult], check: str) -> dict[str, str]:
    return {r.arch: r.status for r in results if r.check == check}


# --- leaf ---------------------------------------------------------------------------------------------


def test_correct_leaf_function_is_green() -> None:
    results = audit_leaf_function(sf.leaf_correct, archs=ARCHS)
    assert [(r.arch, r.check) for r in results] == [(a, c) for a in ARCHS for c in integration.LEAF_CHECKS]
    assert all(r.status == "pass" for r in results), [r.message for r in results if r.status != "pass"]
    block = table(results)[("deepseek_v3", "leaf_is_block")]
    assert block.expected == block.actual == ("DeepseekV3MoE@model.layers.0.mlp",)


@pytest.mark.parametrize(
    "leaf_fn, red, words",
    [
        (sf.leaf_wrong_class_name, "leaf_marks", "marks no module"),
        (sf.leaf_relies_on_deepspeed_defaults, "leaf_marks", "default leaf list is off"),
        (sf.leaf_marks_experts, "leaf_is_block", "Experts@model.layers.0.mlp.experts is inside the MoE block"),
        (sf.leaf_marks_decoder_layer, "leaf_is_block", "DecoderLayer@model.layers.0 is an ancestor of the MoE block"),
        (sf.leaf_on_main_process_only, "leaf_ranks_agree", "rank 1 marks nothing"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_seeded_leaf_bug_is_red(leaf_fn: Callable[..., None], red: str, words: str) -> None:
    results = audit_leaf_function(leaf_fn, archs=ARCHS)
    for arch in ARCHS:
        by_check = {r.check: r for r in results if r.arch == arch}
        assert by_check[red].status == "fail" and words in by_check[red].message, (arch, by_check[red].message)
        others = [c for c, r in by_check.items() if c != red and r.status == "fail"]
        assert not others, (arch, others)  # one bug, one red check


def test_deepspeed_defaults_would_have_given_a_false_green() -> None:
    # Without the neutralisation, DeepSpeed's default list marks Mixtral's block for a function that
    # names nothing itself; under the audit, it marks nothing.
    model = integration.tiny_model("mixtral", device="meta")
    sf.leaf_relies_on_deepspeed_defaults(model)
    assert integration.marked_modules(model) == {"model.layers.0.mlp": "MixtralSparseMoeBlock"}
    model = integration.tiny_model("mixtral", device="meta")
    with integration.deepspeed_default_leaves_off():
        sf.leaf_relies_on_deepspeed_defaults(model)
    assert integration.marked_modules(model) == {}


def test_zero3_guarded_leaf_function_runs_as_under_zero3() -> None:
    from transformers.integrations import is_deepspeed_zero3_enabled

    assert statuses(audit_leaf_function(sf.leaf_guarded_like_llamafactory, archs=["mixtral"]), "leaf_marks") == {
        "mixtral": "pass"
    }
    off = audit_leaf_function(sf.leaf_guarded_like_llamafactory, archs=["mixtral"], zero3=False)
    assert statuses(off, "leaf_marks") == {"mixtral": "fail"}
    assert not is_deepspeed_zero3_enabled()  # restored


def test_unrequested_arch_marked_nothing_is_skipped_not_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leaf_module, "REGISTRY", {a: get_entry(a) for a in ("mixtral", "olmoe")})
    everything = audit_leaf_function(sf.leaf_correct)  # archs=None: what the function claims
    assert statuses(everything, "leaf_marks") == {"mixtral": "pass", "olmoe": "skip"}
    assert "does not handle this model type" in table(everything)[("olmoe", "leaf_marks")].message
    required = audit_leaf_function(sf.leaf_correct, archs=["olmoe"])
    assert statuses(required, "leaf_marks") == {"olmoe": "fail"}


def test_leaf_function_that_raises_fails() -> None:
    def boom(model: torch.nn.Module) -> None:
        raise RuntimeError("no accelerator")

    results = table(audit_leaf_function(boom, archs=["mixtral"]))
    assert results[("mixtral", "leaf_marks")].status == "fail"
    assert "raised on rank 0: RuntimeError: no accelerator" in results[("mixtral", "leaf_marks")].message
    assert results[("mixtral", "leaf_is_block")].status == "skip"


def test_rank_environment_is_restored() -> None:
    import os

    before = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    audit_leaf_function(sf.leaf_correct, archs=["mixtral"])
    assert torch.equal(torch.rand(1), expected)
    assert {k: os.environ.get(k) for k in before} == before


def test_missing_deepspeed_is_setup_not_green(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.setitem(sys.modules, "deepspeed.utils", None)
    results = audit_leaf_function(sf.leaf_correct, archs=["mixtral"])
    assert {r.status for r in results} == {"setup"}
    assert integration.report_exit_code(results) == 2


# --- configure ----------------------------------------------------------------------------------------


def test_correct_configure_function_is_green() -> None:
    results = audit_configure_function(sf.configure_correct, archs=ARCHS + AUX_ARCHS[2:])
    assert all(r.status == "pass" for r in results), [r.message for r in results if r.status != "pass"]
    coef = table(results)[("glm4v_moe", "configure_aux_coef")]
    assert "CE + 0.37·aux" in coef.message and coef.max_abs_err is not None and coef.max_abs_err < 1e-5


@pytest.mark.parametrize(
    "configure_fn, red, words",
    [
        (sf.configure_ignores_coef, "configure_aux_coef", "not the 0.37 the function was given"),
        (sf.configure_forgets_router_logits, "configure_router_logits", "router outputs not switched on"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_seeded_configure_bug_is_red(configure_fn: Callable[..., None], red: str, words: str) -> None:
    results = audit_configure_function(configure_fn, archs=AUX_ARCHS + ["deepseek_v3"])
    for arch in AUX_ARCHS:
        by_check = {r.check: r for r in results if r.arch == arch}
        assert by_check[red].status == "fail" and words in by_check[red].message, (arch, by_check[red].message)
        assert [c for c, r in by_check.items() if r.status == "fail"] == [red]
    # DeepSeek-V3 has no aux loss in transformers: neither bug can exist there.
    assert set(statuses(results, red).values()) >= {"pass"} and statuses(results, red)["deepseek_v3"] == "pass"


def test_coefficient_in_the_wrong_sub_config_is_red() -> None:
    # A VLM reads its flag and coefficient from text_config; the top-level ones do nothing.
    results = table(audit_configure_function(sf.configure_everything_everywhere, archs=["glm4v_moe"]))
    router = results[("glm4v_moe", "configure_router_logits")]
    assert router.status == "fail" and "text_config.output_router_logits=False" in router.message


def test_knobs_on_a_model_without_aux_loss_warn() -> None:
    results = table(audit_configure_function(sf.configure_everything_everywhere, archs=["deepseek_v3"]))
    assert results[("deepseek_v3", "configure_aux_coef")].status == "warn"
    assert "silently ignored" in results[("deepseek_v3", "configure_aux_coef")].message
    record = results[("deepseek_v3", "configure_aux_coef")].to_check_result()
    assert record.status == "pass" and record.message.startswith("WARNING:")


def test_audit_starts_from_class_defaults_not_the_registry_config() -> None:
    # The registry's tiny config pre-sets the flag and a coefficient: a function doing nothing would pass on it.
    assert get_entry("mixtral").config_kwargs["output_router_logits"] is True
    config = integration.default_config("mixtral")
    assert config.output_router_logits is False and config.router_aux_loss_coef == 0.001  # MixtralConfig's defaults
    assert integration.default_config("glm4v_moe").text_config.output_router_logits is False

    def does_nothing(config: Any) -> None:
        return None

    results = audit_configure_function(does_nothing, archs=["mixtral"])
    assert statuses(results, "configure_router_logits") == {"mixtral": "fail"}


def test_unrequested_arch_left_unchanged_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    from moeconf.integration import configure as configure_module

    monkeypatch.setattr(configure_module, "REGISTRY", {a: get_entry(a) for a in ("mixtral", "dbrx")})
    results = audit_configure_function(sf.configure_correct)
    assert statuses(results, "configure_aux_coef") == {"mixtral": "pass", "dbrx": "skip"}


def _returns_new_config(config: Any) -> Any:
    import copy

    configured = copy.deepcopy(config)
    configured.output_router_logits = True
    configured.router_aux_loss_coef = 0.37
    return configured


def _keyword_only(config: Any, *, model_args: Any, is_trainable: bool) -> None:
    sf.configure_correct(config, model_args, is_trainable)


@pytest.mark.parametrize(
    "configure_fn",
    [
        sf.configure_correct,  # (config, model_args, is_trainable), LLaMA-Factory's shape
        lambda config, model_args: sf.configure_correct(config, model_args, True),
        lambda config: sf.configure_correct(config, SimpleNamespace(moe_aux_loss_coef=0.37), True),
        _returns_new_config,
        _keyword_only,
    ],
    ids=["three-args", "two-args", "config-only", "returns-config", "keyword-only"],
)
def test_signature_adapter(configure_fn: Callable[..., Any]) -> None:
    results = audit_configure_function(configure_fn, archs=["mixtral"])
    assert all(r.status == "pass" for r in results), [r.message for r in results]


def test_usage_errors() -> None:
    def needs_tokenizer(config: Any, model_args: Any, is_trainable: bool, tokenizer: Any) -> None:
        return None

    with pytest.raises(TypeError, match="requires tokenizer"):
        audit_configure_function(needs_tokenizer, archs=["mixtral"])
    with pytest.raises(ValueError, match="default"):
        audit_configure_function(sf.configure_correct, archs=["mixtral"], coef=0.001)  # MixtralConfig's own
    with pytest.raises(ValueError, match="pass the same"):
        audit_configure_function(
            sf.configure_correct, archs=["mixtral"], model_args=SimpleNamespace(moe_aux_loss_coef=1)
        )


# --- helpers and records --------------------------------------------------------------------------------


def test_helpers_shapes_and_loss() -> None:
    model = integration.tiny_model("mixtral", integration.default_config("mixtral")).eval()  # no aux loss
    batch = integration.padded_batch(model, batch=2, seq=8)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        k: (2, 8) for k in ("input_ids", "attention_mask", "labels")
    }
    assert (batch["labels"][0, :4] == -100).all() and (batch["attention_mask"][0, :4] == 0).all()
    with torch.no_grad():
        out = model(**batch, use_cache=False)
    torch.testing.assert_close(integration.causal_lm_loss(out.logits, batch["labels"]), out.loss)


def test_records_render_in_moeconf_reports() -> None:
    results = audit_leaf_function(sf.leaf_marks_experts, archs=["mixtral"])
    report = json.loads(integration.render(results, "json"))
    assert report["summary"]["fail"] == 1 and report["summary"]["ok"] is False
    record = next(r for r in report["results"] if r["check"] == "leaf_is_block")
    assert record["backend"] == "integration:tests.seeded_framework:leaf_marks_experts"
    assert "expected: MixtralSparseMoeBlock@model.layers.0.mlp" in record["message"]
    assert record["repro"] == (
        "python -m moeconf.integration leaf tests.seeded_framework:leaf_marks_experts --arch mixtral"
    )
    assert "<testcase" in integration.render(results, "junit")
    assert "leaf_is_block" in integration.render(results, "text")
    assert integration.report_exit_code(results) == 1
    lambda_repro = audit_leaf_function(lambda m: sf.leaf_correct(m), archs=["mixtral"])[0].repro
    assert lambda_repro == ""  # not importable by name: no command that could not find it


def test_repro_command_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from moeconf.integration.__main__ import main

    assert main(["leaf", "tests.seeded_framework:leaf_marks_experts", "--arch", "mixtral"]) == 1
    assert "leaf_is_block" in capsys.readouterr().out
    assert main(["configure", "tests.seeded_framework:configure_correct", "--arch", "mixtral", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["ok"] is True
    assert main(["leaf", "tests.seeded_framework:no_such_function"]) == 2
    assert "has no no_such_function" in capsys.readouterr().err


def test_model_that_raises_with_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    cls = transformers.MixtralForCausalLM
    real_forward = cls.forward

    def raises_with_router_logits(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.config.output_router_logits:
            raise RuntimeError("router logits broke the forward")
        return real_forward(self, *args, **kwargs)

    # Only the configured model raises: the configuration is to blame.
    monkeypatch.setattr(cls, "forward", raises_with_router_logits)
    results = table(audit_configure_function(sf.configure_correct, archs=["mixtral"]))
    assert results[("mixtral", "configure_router_logits")].status == "fail"

    def always_raises(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("upstream bug")

    # The model raises unconfigured too (Llama-4 in transformers 5.24): not the function's fault, not judged.
    monkeypatch.setattr(cls, "forward", always_raises)
    results = table(audit_configure_function(sf.configure_correct, archs=["mixtral"]))
    assert {r.status for r in results.values()} == {"skip"}
    assert "raises unconfigured too" in results[("mixtral", "configure_router_logits")].message
