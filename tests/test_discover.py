"""``moeconf discover``: hide a registered entry, rediscover it from the installed block, compare."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from moeconf import registry
from moeconf.cli import main as cli_main
from moeconf.registry import REGISTRY, ArchEntry
from moeconf.spec import ExpertSpec, MoESpec
from moeconf.tools import discover as disc
from moeconf.tools.discover import candidates as disc_candidates

pytestmark = pytest.mark.slow

CANDIDATE_TYPES = (
    # The core ten first, then every router family the registry holds (softmax / sigmoid / top-k on
    # logits / group-limited / p-norm, Llama-4, Kolibri, ERNIE, ...).
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v3",
    "gpt_oss",
    "jamba",
    "granitemoe",
    "olmoe",
    "dbrx",
    "llama4",
    "minimax",
    "qwen3_next",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
    "qwen3_vl_moe",
    "qwen3_vl_moe_text",
    "qwen4_exp",
    "qwen4_exp_text",
    "qwen3_omni_moe_thinker",
    "qwen3_omni_moe_text",
    "qwen3_omni_moe_talker_text",
    "flex_olmo",
    "mellum",
    "lara_mini",
    "hunyuan_v1_moe",
    "granitemoe_swa",
    "granitemoeshared",
    "granitemoehybrid",
    "aria",
    "aria_text",
    "cohere2_moe",
    "llama4_text",
    "deepseek_v32",
    "glm4_moe",
    "glm4_moe_lite",
    "glm_moe_dsa",
    "dots1",
    "kimi_linear",
    "bailing_hybrid",
    "solar_open",
    "axk1",
    "axk2",
    "mimo_v2_flash",
    "hy_v4",
    "exaone_moe",
    "beam",
    "sarvam_mla",
    "sarvam_moe",
    "mistral4",
    "glm4v_moe",
    "glm4v_moe_text",
    "dots3_note",
    "dots3_note_text",
    "hy_v4_vl",
    "hy_v4_vl_text",
    "deepseek_ocr2",
    "deepseek_ocr2_text",
    "unlimited_ocr",
    "unlimited_ocr_text",
    "mistral_large4",
    "mistral_large4_text",
    "minimax_m2",
    "step3p7",
    "step3p5",
    "hy_v3",
    "laguna",
    "afmoe",
    "lfm2_moe",
    "deepseek_v4",
    "flint",
    "kolibri1",
    "ernie4_5_moe",
    "longcat_flash",
    "nemotron_h",
    "glm5_next",
    "glm5_next_text",
    "minimax_m3_vl",
    "minimax_m3_vl_text",
    "openai_privacy_filter",
    "qwen3_omni_moe",
)
"""Types discover reproduces; those registered *without* declared deviations are tested (an entry
with an xfail declares the documented behaviour, discover finds the shipped one)."""

TYPES = tuple(t for t in CANDIDATE_TYPES if t in REGISTRY and not REGISTRY[t].expectations)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add OpenMP hand-offs, which cost seconds per test on a
    loaded 2-core runner (measured: 5 s → 0.1 s for one discovery)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mlp_signature(form: ExpertSpec) -> tuple[object, ...]:
    """An MLP form: the activation where the formula uses it, constants where they apply."""
    return (
        form.glu,
        None if form.glu in ("gptoss_clamped", "softcapped_swiglu") else form.activation,
        form.gptoss_limit if form.glu in ("gptoss_clamped", "clamped_swiglu", "clamped_after_act") else None,
        form.gptoss_alpha if form.glu == "gptoss_clamped" else None,
        (form.softcap_gate, form.softcap_up) if form.glu == "softcapped_swiglu" else None,
    )


def spec_signature(spec: MoESpec) -> dict[str, object]:
    """The fields that decide what a block computes (eps values below fp32 resolution excluded)."""
    r, x, s = spec.router, spec.experts, spec.shared
    return {
        "sizes": (spec.num_experts, spec.top_k, spec.hidden, spec.intermediate, spec.identity_experts),
        "scoring": r.scoring,
        "select_on": r.select_on,
        "selection_bias": r.selection_bias,
        "weight_from": r.weight_from,
        "renorm": r.renorm,
        "renorm_p": r.renorm_p if r.renorm == "pnorm" else None,
        "group_limit": r.group_limit,
        "routed_scaling": (r.routed_scaling, r.scaling_site) if r.routed_scaling != 1 else None,
        "logit_bias": r.logit_bias,
        "logit_softcap": r.logit_softcap,
        "experts": mlp_signature(x) + (x.bias, x.weight_site),
        "shared": None if s is None else (s.intermediate, s.gate, s.combine) + mlp_signature(s.form),
        "output_norm": spec.output_norm_eps is not None,
    }


def test_enough_types_are_rediscovered() -> None:
    assert len(TYPES) >= 20, TYPES


@pytest.mark.parametrize("model_type", TYPES)
def test_rediscovers_registered_entry(model_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    registered = REGISTRY[model_type]
    monkeypatch.setattr(registry, "REGISTRY", {k: v for k, v in REGISTRY.items() if k != model_type})
    result = disc.discover(model_type, registered.config_kwargs, verify=False)
    assert result.ok, result.explanation
    proposed = result.proposed_entry
    assert proposed is not None and result.best is not None and result.best.matched
    assert spec_signature(proposed.spec) == spec_signature(registered.spec)
    assert {(b.path, b.canonical, b.layout) for b in proposed.params} == {
        (b.path, b.canonical, b.layout) for b in registered.params
    }
    assert (proposed.block_class, proposed.router_path, proposed.experts_path, proposed.routing_from) == (
        registered.block_class,
        registered.router_path,
        registered.experts_path,
        registered.routing_from,
    )
    # The proposal passes `moeconf check` parity (engine, hf-eager, fp32, every case).
    records = disc.verify_entry(proposed)
    assert records and not [r for r in records if r.status in ("fail", "error")], [
        (r.case, r.check, r.message) for r in records if r.status in ("fail", "error")
    ]


def test_generic_tiny_config_finds_families() -> None:
    mixtral = disc.discover("mixtral", verify=False).proposed_entry
    assert mixtral is not None and mixtral.spec.router.renorm == "always" and mixtral.spec.router.scoring == "softmax"
    dsv3 = disc.discover("deepseek_v3", verify=False).proposed_entry
    assert dsv3 is not None
    r = dsv3.spec.router
    assert (r.scoring, r.selection_bias, r.group_limit is not None, r.routed_scaling) == (
        "sigmoid",
        True,
        True,
        disc.TINY_SCALING,
    )
    assert r.group_limit.score == "top2sum" and r.group_limit.fill == "-inf"  # type: ignore[union-attr]
    assert dsv3.spec.shared is not None and dsv3.aux_coef_attr is None


def test_proposed_source_rebuilds_the_entry() -> None:
    result = disc.discover("qwen2_moe", REGISTRY["qwen2_moe"].config_kwargs, verify=False)
    assert result.proposed_entry_source is not None
    namespace: dict[str, object] = {}
    exec(disc.SOURCE_IMPORTS + "entry = " + result.proposed_entry_source, namespace)  # noqa: S102 (our own output)
    rebuilt = namespace["entry"]
    assert isinstance(rebuilt, ArchEntry)
    assert rebuilt.spec == result.proposed_entry.spec  # type: ignore[union-attr]
    assert rebuilt.params == result.proposed_entry.params  # type: ignore[union-attr]
    assert (
        rebuilt.aux_coef_attr == "router_aux_loss_coef" and rebuilt.config_kwargs == REGISTRY["qwen2_moe"].config_kwargs
    )


def test_cli_proposes_and_ranks(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["discover", "olmoe"]) == 0
    out = capsys.readouterr().out
    assert "ArchEntry(" in out and "match" in out and "records pass" in out


def test_cli_exits_1_when_nothing_matches(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Only router families the Mixtral block does not compute (no renormalisation, sigmoid, ...).
    real = disc_candidates.router_candidates
    monkeypatch.setattr(
        disc_candidates,
        "router_candidates",
        lambda facts, config: [
            c for c in real(facts, config) if c.spec.renorm == "never" and c.spec.select_on == "scores"
        ],
    )
    assert cli_main(["discover", "mixtral", "--format", "json"]) == 1
    out = capsys.readouterr().out
    assert '"ok": false' in out and "no candidate reproduces" in out


def test_cli_explains_unbindable_blocks(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["discover", "switch_transformers"]) == 1
    out = capsys.readouterr().out
    assert "no candidate can bind every block parameter" in out and "experts.expert_" in out
