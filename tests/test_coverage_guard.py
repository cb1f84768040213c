"""Coverage guard: every MoE model type of the installed transformers is registered or declared unsupported."""

from __future__ import annotations

import pytest
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from moeconf import registry
from moeconf.registry import REGISTRY
from moeconf.tools import coverage

NOTES_FAMILIES = (
    # Hand-written list of the token-level MoE model types of transformers 5.24, by router family
    # (docs/router-families.md; the unsupported ones in docs/transformers-moe-landscape.md).
    "mixtral",
    "minimax",
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_next",
    "qwen3_5_moe",
    "qwen3_vl_moe",
    "qwen3_omni_moe",
    "qwen4_exp",
    "olmoe",
    "flex_olmo",
    "mellum",
    "lara_mini",
    "jamba",
    "hunyuan_v1_moe",
    "dbrx",
    "gemma4",
    "diffusion_gemma",
    "granitemoe",
    "granitemoe_swa",
    "granitemoeshared",
    "granitemoehybrid",
    "aria",
    "jetmoe",
    "gpt_oss",
    "openai_privacy_filter",
    "cohere2_moe",
    "deepseek_v3",
    "deepseek_v32",
    "glm4_moe",
    "glm4_moe_lite",
    "glm_moe_dsa",
    "glm4v_moe",
    "glm5_next",
    "dots1",
    "dots3_note",
    "kimi_linear",
    "bailing_hybrid",
    "solar_open",
    "axk1",
    "axk2",
    "mimo_v2_flash",
    "hy_v4",
    "hy_v4_vl",
    "nemotron_h",
    "exaone_moe",
    "beam",
    "sarvam_mla",
    "sarvam_moe",
    "minimax_m2",
    "minimax_m3_vl",
    "step3p7",
    "step3p5",
    "hy_v3",
    "laguna",
    "afmoe",
    "lfm2_moe",
    "muse_spark",
    "deepseek_v4",
    "inkling2",
    "inkling2_loop",
    "inkling",
    "flint",
    "kolibri1",
    "llama4",
    "ernie4_5_moe",
    "ernie4_5_vl_moe",
    "longcat_flash",
    "zaya",
    "deepseek_v2",
    "deepseek_ocr2",
    "unlimited_ocr",
    "mistral4",
    "mistral_large4",
    "switch_transformers",
    "nllb-moe",
    "phimoe",
    "doge",
    "vitpose_backbone",
)
NOT_MOE = ("big_bird", "bigbird_pegasus", "informer", "mra", "moshi", "granite_docling", "kyutai_speech_to_text")


def test_every_discovered_moe_type_is_covered() -> None:
    missing = coverage.uncovered()
    if missing:
        pytest.fail(
            f"{len(missing)} MoE model types of the installed transformers are neither registered nor declared "
            f"unsupported (add an ArchEntry, or a reason to moeconf.tools.coverage.DECLARED_UNSUPPORTED): "
            + ", ".join(missing)
        )


def test_guard_reports_a_dropped_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    without = {k: v for k, v in REGISTRY.items() if k != "mixtral"}
    monkeypatch.setattr(registry, "REGISTRY", without)
    assert "mixtral" in coverage.uncovered()


def test_discovery_finds_the_landscape() -> None:
    found = coverage.discover_moe_model_types()
    assert len(found) >= 95, f"only {len(found)} MoE model types discovered"
    expected = [t for t in NOTES_FAMILIES if t in CONFIG_MAPPING_NAMES]
    assert len(expected) >= 70  # the hand-written families still exist in the installed transformers
    missing = [t for t in expected if t not in found]
    assert not missing, f"hand-listed MoE types not discovered: {missing}"
    # Sub-config and alias types, and the evidence string.
    for model_type in ("qwen3_5_moe_text", "llama4_text", "sarvam_mla", "sarvam_moe"):
        assert model_type in found, model_type
    assert "DeepseekV3Model" in found["sarvam_mla"]
    assert "@use_experts_implementation" in found["mixtral"] and "load_balancing_loss_func" in found["mixtral"]
    # Vision/audio sub-configs of MoE folders declare no experts.
    assert "qwen3_5_moe_vision" not in found and "llama4_vision_model" not in found


def test_no_false_positives() -> None:
    found = coverage.discover_moe_model_types()
    assert not [t for t in NOT_MOE if t in found]
    assert set(NOT_MOE) <= set(coverage.KNOWN_FALSE_POSITIVES)


def test_evidence_rule_on_source_snippets() -> None:
    moe = coverage.scan_source("x", "modeling_x.py", "class XTopKRouter(nn.Module):\nclass XExperts(nn.Module):\n")
    assert moe.is_moe and moe.classes["router"] == ("XTopKRouter",)
    router_only = coverage.scan_source("y", "modeling_y.py", "class YDensityRouter(nn.Module):\n")
    assert not router_only.is_moe
    decorated = coverage.scan_source("z", "modeling_z.py", "@use_experts_implementation\nclass ZThing(nn.Module):\n")
    assert decorated.is_moe


def test_declared_unsupported_are_moe_and_unregistered() -> None:
    found = coverage.discover_moe_model_types()
    for model_type, reason in coverage.unsupported_model_types().items():
        assert model_type in found, f"{model_type} is declared unsupported but is not an MoE type"
        assert model_type not in REGISTRY, f"{model_type} is both registered and declared unsupported"
        assert reason and "\n" not in reason
