"""Variants of registry entries for older transformers releases: 4.x (per-expert ``ModuleList``
experts, ``LEGACY_4X``) and 5.x releases before a block's layout changed (``RELEASE_OVERRIDES``).

transformers 5 stores experts as fused 3-D parameters; 4.57 kept one ``nn.Module`` per expert, called
only for experts that received tokens. That is where the ZeRO-3 fetch-order hang and the ZeRO-2 /
FSDP None-grad hang really bite (docs/regression-cases.md #1, #2), so the partitioning suite
runs these entries under transformers 4.57. Only overrides are listed; the rest of the entry holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moeconf.registry import versions
from moeconf.registry.core import E, shared_mlp
from moeconf.registry.entry import ArchEntry, Binding, Expectation
from moeconf.registry.versions import in_releases, release_range
from moeconf.spec import GroupLimit


def per_expert(*, gate: str, up: str, down: str) -> tuple[Binding, ...]:
    """Bindings of ``experts.{e}.<gate>/<up>/<down>.weight`` for every expert ``e``."""
    return tuple(
        Binding(f"experts.{e}.{module}.weight", (canonical,), expert=e)
        for e in range(E)
        for module, canonical in ((gate, "experts.w_gate"), (up, "experts.w_up"), (down, "experts.w_down"))
    )


SHARED_MLP = tuple(Binding(f"shared_experts.{m}_proj.weight", (f"shared.w_{m}",)) for m in ("gate", "up", "down"))


def none_grads_of_unrouted_experts(where: str) -> tuple[Expectation, ...]:
    """The 4.x eager block calls only the experts that received tokens (``where``: the loop, in
    transformers 4.57.6), so an unrouted expert's weights keep ``.grad`` None instead of zeros: a real
    difference of 4.x, not a harness defect. AdamW then skips that expert's weight decay and moment
    update, and ZeRO-2 / FSDP fall out of step (DeepSpeed #5066). 5.0 fused the experts into 3-D
    parameters, whose gradient is zero on unrouted rows."""
    reason = (
        f"transformers 4.x: {where} calls only the experts that received tokens (per-expert nn.ModuleList), so an "
        "unrouted expert's weights get .grad None, not zeros (AdamW skips their decay and moments; ZeRO-2/FSDP hang, "
        "DeepSpeed #5066); 5.0 fused the experts into 3-D parameters"
    )
    # the cases in which some expert receives no token (in `random`, every expert gets one of the tiny
    # config's 8; at a config sample with more experts than the 32 picks of its tokens, some stay idle)
    idle_cases = ("single_token", "empty_expert", "one_expert")
    tiny = tuple(
        Expectation("xfail", reason, check="grad_experts", backend="hf-eager", releases="<5", case=case)
        for case in idle_cases
    )
    samples = tuple(
        Expectation(
            "xfail", reason, check="grad_experts", backend="hf-eager", releases="<5", case="random", config=kind
        )
        for kind in ("default", "published", "hypothesis")
    )
    return tiny + samples


LEGACY_4X: dict[str, dict[str, Any]] = {
    # 4.57: router is a bare nn.Linear (records logits); routing happens inside the block's forward.
    "mixtral": dict(
        params=(Binding("gate.weight", ("router.weight",)),) + per_expert(gate="w1", up="w3", down="w2"),
        router_logits_index=None,
        routing_from="none",
        experts_implementations=("eager",),
        expectations=none_grads_of_unrouted_experts("MixtralSparseMoeBlock.forward (modeling_mixtral.py:125-126)"),
    ),
    "qwen3_moe": dict(
        params=(Binding("gate.weight", ("router.weight",)),)
        + per_expert(gate="gate_proj", up="up_proj", down="down_proj"),
        router_logits_index=None,
        routing_from="none",
        experts_implementations=("eager",),
        expectations=none_grads_of_unrouted_experts("Qwen3MoeSparseMoeBlock.forward (modeling_qwen3_moe.py:249-250)"),
    ),
    # 4.57: the router returns (topk_indices, topk_weights) and fills masked groups with 0.0, not -inf.
    "deepseek_v3": dict(
        params=(
            Binding("gate.weight", ("router.weight",)),
            Binding("gate.e_score_correction_bias", ("router.selection_bias",)),
        )
        + per_expert(gate="gate_proj", up="up_proj", down="down_proj")
        + SHARED_MLP,
        routing_from="router_index_weights",
        experts_implementations=("eager",),
        spec_router=dict(group_limit=GroupLimit(n_group=2, topk_group=1, fill="zero")),
        expectations=none_grads_of_unrouted_experts("DeepseekV3MoE.moe (modeling_deepseek_v3.py:184-194)"),
    ),
}


# -- older 5.x releases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseOverride:
    """Fields of a registered entry that differ on the transformers releases in ``releases``.

    Attributes:
        releases: a PEP 440 range (``"<5.13"``), checked by ``moeconf.registry.versions``.
        fields: ``ArchEntry`` fields to replace (``spec_router``: fields of ``spec.router``), as in
            ``LEGACY_4X``.
        why: the upstream change, with the release that made it, so the override can be dropped when
            moeconf stops supporting the older releases.
    """

    releases: str
    fields: dict[str, Any]
    why: str

    def __post_init__(self) -> None:
        release_range(self.releases)  # a malformed range fails at import, not silently never applies


def _merged(kwargs: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``update``'s fields; a dict updating a dict (a sub-config) is merged, not replaced."""
    out = dict(kwargs)
    for key, value in update.items():
        both_dicts = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both_dicts else value
    return out


def apply_overrides(entry: ArchEntry, overrides: dict[str, Any]) -> ArchEntry:
    """``entry`` with ``overrides`` replaced; ``spec_<part>`` replaces fields of ``spec.<part>``
    (``spec_router``, ``spec_experts``), ``config_kwargs_update`` fields of ``config_kwargs`` (a dict
    into a dict field, a sub-config's ``text_config``, merges the same way), and
    ``expectations_add`` is put before the entry's own expectations, so an override names only what
    differs.

    NOTE: first, because ``ArchEntry.expectation`` takes the first declaration that matches: a bug of
    a few releases declared here names what really fails there, not a wider declaration of the entry.
    """
    overrides = dict(overrides)
    if "config_kwargs_update" in overrides:  # only the named config fields differ
        overrides["config_kwargs"] = _merged(entry.config_kwargs, overrides.pop("config_kwargs_update"))
    if "expectations_add" in overrides:
        added = tuple(overrides.pop("expectations_add"))
        overrides["expectations"] = added + tuple(overrides.get("expectations", entry.expectations))
    parts = {key.removeprefix("spec_"): overrides.pop(key) for key in [k for k in overrides if k.startswith("spec_")]}
    if parts:
        spec = overrides.get("spec", entry.spec)
        overrides["spec"] = dataclasses.replace(
            spec, **{part: dataclasses.replace(getattr(spec, part), **fields) for part, fields in parts.items()}
        )
    return dataclasses.replace(entry, **overrides)


# Before 5.13 the GraniteMoE blocks were JetMoE-shaped: GraniteMoeTopKGating (router.layer, a Linear)
# returns (order, token, gates, counts, logits) grouped by expert, and input_linear / output_linear
# (GraniteMoeParallelExperts, [E, 2I, H] and [E, H, I]) sit on the block and take expert-sorted rows
# (5.12.1 modeling_granitemoe.py: GraniteMoeTopKGating.forward, GraniteMoeMoE.forward).
GRANITE_GROUPED = ReleaseOverride(
    ">=5.0,<5.13",
    dict(
        params=(
            Binding("router.layer.weight", ("router.weight",)),
            # chunk(2) gives act(first half) · second half: gate rows first.
            Binding("input_linear.weight", ("experts.w_gate", "experts.w_up"), "gate_up_rows"),
            Binding("output_linear.weight", ("experts.w_down",)),
        ),
        router_logits_index=4,
        experts_path="",
        routing_from="router_grouped",
        experts_implementations=("eager",),  # GraniteMoeParallelExperts is not @use_experts_implementation
    ),
    "5.13.0 replaced GraniteMoeTopKGating/GraniteMoeParallelExperts with a top-k router and fused experts",
)

# 5.6–5.18: OpenAIPrivacyFilterExperts hard-codes its clamped SwiGLU constants (5.6.2
# modeling_openai_privacy_filter.py:272-273, alpha = 1.702, limit = 7.0) and the config has no
# swiglu_limit field; 5.19.0 reads config.swiglu_alpha / swiglu_limit.
PRIVACY_FILTER_FIXED_CLAMP = ReleaseOverride(
    ">=5.6,<5.19",
    dict(spec_experts=dict(gptoss_alpha=1.702, gptoss_limit=7.0)),
    "5.19.0 made the clamp configurable (config.swiglu_limit)",
)

# Before 5.18 Aria's experts were AriaGroupedExpertsGemm pairs, fc1 [E, H, 2I] (chunk(2): silu(first) ·
# second) and fc2 [E, I, H], and AriaExperts.forward(hidden, router_logits) did the top-k itself (5.6.2
# modeling_aria.py: AriaExperts.route_tokens_to_experts): no call carries the routing, so it is not read.
ARIA_GEMM_EXPERTS = ReleaseOverride(
    ">=5.0,<5.18",
    dict(
        params=(
            Binding("router.weight", ("router.weight",)),
            Binding("experts.fc1.weight", ("experts.w_gate", "experts.w_up"), "gate_up_cols"),
            Binding("experts.fc2.weight", ("experts.w_down",), "transposed"),
        )
        + tuple(Binding(f"shared_experts.{m}_proj.weight", (f"shared.w_{m}",)) for m in ("gate", "up", "down")),
        routing_from="none",
        experts_implementations=("eager",),  # AriaExperts is not @use_experts_implementation there
    ),
    "5.18.0 replaced AriaGroupedExpertsGemm with fused gate_up_proj / down_proj experts",
)

# Before 5.21 Qwen3OmniMoeThinkerForConditionalGeneration.model was the text model itself (5.6.2
# modeling_qwen3_omni_moe.py: self.model = Qwen3OmniMoeThinkerTextModel); 5.21.0 wraps it as language_model.
OMNI_THINKER_TEXT_AT_MODEL = ReleaseOverride(
    ">=5.0,<5.21",
    dict(block_path="model.layers.0.mlp"),
    "5.21.0 moved the thinker's text model to model.language_model",
)
OMNI_TEXT_AT_THINKER_MODEL = ReleaseOverride(
    ">=5.0,<5.21",
    dict(block_path="thinker.model.layers.0.mlp"),
    "5.21.0 moved the thinker's text model to thinker.model.language_model",
)

# Before 5.4 AFMoE's block was AfmoeMoE with AfmoeExperts, an nn.ModuleList of per-expert AfmoeMLP
# (gate_proj / up_proj / down_proj), called as experts(hidden [B, S, H], index [B, S, k], weights [B, S, k])
# (5.0.0 modeling_afmoe.py:174-280); the router and the expert_bias buffer are where 5.24 has them.
AFMOE_MODULE_LIST = ReleaseOverride(
    ">=5.0,<5.4",
    dict(
        block_class="AfmoeMoE",
        params=(
            Binding("router.gate.weight", ("router.weight",)),
            Binding("expert_bias", ("router.selection_bias",)),
        )
        + per_expert(gate="gate_proj", up="up_proj", down="down_proj")
        + shared_mlp("shared_experts"),
        experts_implementations=("eager",),  # an nn.ModuleList: no experts implementation to switch
    ),
    "5.4.0 replaced AfmoeMoE / per-expert AfmoeExperts with AfmoeSparseMoeBlock and fused experts",
)


def _ernie_vl_names(names: dict[str, str]) -> ReleaseOverride:
    """ERNIE-4.5-VL's class names before 5.3: ``Ernie4_5_VL_Moe*`` (5.2.0 modeling_ernie4_5_vl_moe.py:430,
    configuration_ernie4_5_vl_moe.py ``__all__``); 5.3.0 renamed them ``Ernie4_5_VLMoe*`` (keeping
    the old model names as deprecated aliases, but not the block or config names)."""
    return ReleaseOverride(">=5.0,<5.3", names, "5.3.0 renamed the Ernie4_5_VL_Moe* classes to Ernie4_5_VLMoe*")


ERNIE_VL_OLD_NAMES = _ernie_vl_names(
    dict(
        config_class="Ernie4_5_VL_MoeConfig",
        block_class="Ernie4_5_VL_MoeMoeBlock",
        model_class="Ernie4_5_VL_MoeForConditionalGeneration",
    )
)
ERNIE_VL_TEXT_OLD_NAMES = _ernie_vl_names(
    dict(
        config_class="Ernie4_5_VL_MoeTextConfig",
        block_class="Ernie4_5_VL_MoeMoeBlock",
        model_class="Ernie4_5_VL_MoeTextModel",
    )
)

# Before 5.4 GraniteMoeHybridConfig accepts only "mamba" / "attention" layer types (5.3.0
# configuration_granitemoehybrid.py:215-216, ValueError otherwise); 5.4.0 dropped the check and later
# releases name the type "full_attention". The modeling code only tests == "mamba" in both.
GRANITE_HYBRID_ATTENTION_NAME = ReleaseOverride(
    ">=5.0,<5.4",
    dict(config_kwargs_update=dict(layer_types=["attention"])),
    "5.4.0 dropped GraniteMoeHybridConfig's layer-type check (only 'mamba' / 'attention' before)",
)

# In 5.0.0 PhiMoE's router and HunYuan-MoE-V1's route_tokens_to_experts scatter the top-k weights into a
# dense [N, E] tensor (5.0.0 modeling_phimoe.py:512, modeling_hunyuan_v1_moe.py:304-306) and hand it to
# experts that index it by top-k position: the experts call carries no [N, k] weights to read.
DENSE_WEIGHTS_TO_EXPERTS = ReleaseOverride(
    ">=5.0,<5.1",
    dict(routing_from="none"),
    "5.1.0 passes the [N, k] top-k weights to the experts",
)

# 5.11-5.12: DeepseekV32Config has a num_experts field of its own (default 256; num_local_experts maps to
# it, 5.12.1 configuration_deepseek_v32.py:81, :119), which sizes the fused experts, while the router
# reads n_routed_experts; 5.13.0 maps num_local_experts to n_routed_experts and drops the field.
DSV32_NUM_EXPERTS_FIELD = ReleaseOverride(
    ">=5.11,<5.13",
    dict(config_kwargs_update=dict(num_experts=E)),
    "5.13.0 made n_routed_experts the only expert count of DeepseekV32Config",
)


def _block_output_recorded(where: str) -> ReleaseOverride:
    """5.0-5.1: the model records ``OutputRecorder(<SparseMoeBlock>, index=1)`` as router logits, but the
    block returns the bare hidden-states tensor, which the recorder then collects whole (5.0.0
    utils/generic.py:955-956: a non-tuple output is recorded as it is). ``load_balancing_loss_func``
    softmaxes those ``[N, H]`` hidden states and one-hots their top-k against ``num_experts``: it raises
    whenever ``hidden_size > num_experts`` (every real checkpoint; the tiny config too), and is garbage
    otherwise. ``where``: the recorder, the block's return and the raising line in 5.0.0."""
    reason = (
        f"upstream: the model records its MoE block's output as router_logits ({where}): the block returns "
        "the bare hidden states, so load_balancing_loss_func gets [N, hidden_size] tensors and one_hot raises "
        "'Class values must be smaller than num_classes' (any model with hidden_size > num_experts, "
        "output_router_logits=True); fixed in 5.2.0 (OutputRecorder(<TopKRouter>, index=0))"
    )
    return ReleaseOverride(
        ">=5.0,<5.2",
        {
            "expectations_add": tuple(
                Expectation("xfail", reason, check=check, releases=">=5.0,<5.2")
                for check in ("aux_loss", "grad_aux_loss")
            )
        },
        "5.2.0 records the top-k router's logits (OutputRecorder(<TopKRouter>, index=0)), not the block's output",
    )


QWEN3_NEXT_BLOCK_OUTPUT_RECORDED = _block_output_recorded(
    "5.0.0 modeling_qwen3_next.py:982 OutputRecorder(Qwen3NextSparseMoeBlock, index=1); the block returns "
    "a tensor, :899; one_hot in load_balancing_loss_func, :1134"
)
OMNI_THINKER_BLOCK_OUTPUT_RECORDED = _block_output_recorded(
    "5.0.0 modeling_qwen3_omni_moe.py:1727 OutputRecorder(Qwen3OmniMoeThinkerTextSparseMoeBlock, index=1); "
    "the block returns a tensor, :1468; one_hot in load_balancing_loss_func, :1902"
)


def _router_not_recorded(where: str) -> ReleaseOverride:
    """5.0-5.1: the model's ``router_logits`` recorder targets ``nn.Linear`` modules by a name the MoE
    router does not have (``where``), so it collects nothing from the block: ``outputs.router_logits``
    lacks the layer and the model's aux loss leaves it out (0 when no layer is recorded,
    ``load_balancing_loss_func`` returning 0 for an empty recording)."""
    reason = (
        f"upstream: the model's router_logits recorder matches no module of the MoE block ({where}), so the "
        "block's router logits are never recorded and the model's load-balancing loss leaves the layer out "
        "although output_router_logits=True; fixed in 5.2.0 (the recorder targets the router class)"
    )
    return ReleaseOverride(
        ">=5.0,<5.2",
        {
            "expectations_add": tuple(
                Expectation("xfail", reason, check=check, releases=">=5.0,<5.2")
                for check in ("aux_loss", "grad_aux_loss")
            )
        },
        "5.2.0 records the router class (JetMoeTopKGating, Glm4vMoeTextTopkRouter) as router_logits",
    )


JETMOE_ROUTER_NOT_RECORDED = _router_not_recorded(
    "5.0.0 modeling_jetmoe.py:579 OutputRecorder(nn.Linear, layer_name='gate', index=1); the router's Linear is "
    "mlp.router.layer (:197, :246) and no Linear of the model has 'gate' in its name"
)
GLM4V_MOE_ROUTER_NOT_RECORDED = _router_not_recorded(
    "5.0.0 modeling_glm4v_moe.py:429 OutputRecorder(nn.Linear, layer_name='mlp.gate', index=0); the router "
    "mlp.gate is Glm4vMoeTextTopkRouter, an nn.Module holding its own weight (:209, :278), not an nn.Linear: "
    "only the vision blocks' mlp.gate_proj match"
)

# 5.0.0: JetMoeConfig and Qwen3VLMoeTextConfig define no pad_token_id, which the text model reads
# (5.0.0 modeling_jetmoe.py:598, modeling_qwen3_vl_moe.py:908: self.padding_idx = config.pad_token_id):
# a model built from a config that does not name it raises AttributeError (the block alone builds; moeconf
# builds the tiny model on meta only to find what it records). A checkpoint's config.json that carries
# pad_token_id loads; so does the tiny config with it. 5.1.0 added the field (default None).
PAD_TOKEN_ID_NOT_A_FIELD = ReleaseOverride(
    ">=5.0,<5.1",
    {"config_kwargs_update": {"pad_token_id": None}},
    "5.1.0 declares pad_token_id (default None) in JetMoeConfig and Qwen3VLMoeTextConfig",
)
TEXT_PAD_TOKEN_ID_NOT_A_FIELD = ReleaseOverride(
    PAD_TOKEN_ID_NOT_A_FIELD.releases,
    {"config_kwargs_update": {"text_config": {"pad_token_id": None}}},
    PAD_TOKEN_ID_NOT_A_FIELD.why,
)

# 5.10-5.12: DeepseekOcr2TextMoe.route_tokens_to_experts reads self.num_experts, which __init__ never sets
# (5.12.1 modeling_deepseek_ocr2.py:1198-1210), on the topk_method="group_limited_greedy" path (:1225): every
# forward of a group-limited config raises AttributeError (the DeepSeek-V2 bug, declared on deepseek_v2, in
# the copy). The config's default and DeepSeek-OCR-2's own routing, "greedy" (configuration_deepseek_ocr2.py:245),
# runs: the block is checked with it there. 5.13.0 sets num_experts and rewrote the group path.
OCR2_GREEDY_ONLY = {"spec_router": {"group_limit": None}}
OCR2_GROUP_PATH_BROKEN = "5.13.0 fixed DeepseekOcr2TextMoe's group_limited_greedy path (self.num_experts never set)"
DEEPSEEK_OCR2_GREEDY = ReleaseOverride(
    ">=5.0,<5.13",
    {**OCR2_GREEDY_ONLY, "config_kwargs_update": {"text_config": {"topk_method": "greedy"}}},
    OCR2_GROUP_PATH_BROKEN,
)
DEEPSEEK_OCR2_TEXT_GREEDY = ReleaseOverride(
    ">=5.0,<5.13", {**OCR2_GREEDY_ONLY, "config_kwargs_update": {"topk_method": "greedy"}}, OCR2_GROUP_PATH_BROKEN
)

# 5.11-5.15: DiffusionGemmaTextConfig.num_global_key_value_heads defaults to None and the full-attention
# layers divide by it (5.12.1 modeling_diffusion_gemma.py:291-292 and :393-394, num_attention_heads //
# num_key_value_heads): a config that does not name it cannot build a layer. The checkpoints name it
# (google/gemma-4: 2); so does the tiny config there. 5.16.0 made attention per layer type (the config
# folds num_global_key_value_heads into it, configuration_diffusion_gemma.py:131-136).
DIFFUSION_GEMMA_GLOBAL_KV = {"num_global_key_value_heads": 2}  # = the tiny TEXT_CONFIG's num_key_value_heads
DIFFUSION_GEMMA_GLOBAL_KV_WHY = "5.16.0 derives the full-attention layers' key/value heads when the config omits them"
DIFFUSION_GEMMA_GLOBAL_KV_HEADS = ReleaseOverride(
    ">=5.0,<5.16",
    {"config_kwargs_update": {"text_config": DIFFUSION_GEMMA_GLOBAL_KV}},
    DIFFUSION_GEMMA_GLOBAL_KV_WHY,
)
DIFFUSION_GEMMA_TEXT_GLOBAL_KV_HEADS = ReleaseOverride(
    ">=5.0,<5.16", {"config_kwargs_update": DIFFUSION_GEMMA_GLOBAL_KV}, DIFFUSION_GEMMA_GLOBAL_KV_WHY
)

RELEASE_OVERRIDES: dict[str, tuple[ReleaseOverride, ...]] = {
    "deepseek_v32": (DSV32_NUM_EXPERTS_FIELD,),
    "deepseek_ocr2": (DEEPSEEK_OCR2_GREEDY,),
    "deepseek_ocr2_text": (DEEPSEEK_OCR2_TEXT_GREEDY,),
    "diffusion_gemma": (DIFFUSION_GEMMA_GLOBAL_KV_HEADS,),
    "diffusion_gemma_text": (DIFFUSION_GEMMA_TEXT_GLOBAL_KV_HEADS,),
    "afmoe": (AFMOE_MODULE_LIST,),
    "ernie4_5_vl_moe": (ERNIE_VL_OLD_NAMES,),
    "ernie4_5_vl_moe_text": (ERNIE_VL_TEXT_OLD_NAMES,),
    "phimoe": (DENSE_WEIGHTS_TO_EXPERTS,),
    "hunyuan_v1_moe": (DENSE_WEIGHTS_TO_EXPERTS,),
    "qwen3_next": (QWEN3_NEXT_BLOCK_OUTPUT_RECORDED,),
    "jetmoe": (PAD_TOKEN_ID_NOT_A_FIELD, JETMOE_ROUTER_NOT_RECORDED),
    "glm4v_moe": (GLM4V_MOE_ROUTER_NOT_RECORDED,),
    "qwen3_vl_moe": (TEXT_PAD_TOKEN_ID_NOT_A_FIELD,),
    "qwen3_vl_moe_text": (PAD_TOKEN_ID_NOT_A_FIELD,),
    "qwen3_omni_moe_thinker": (OMNI_THINKER_TEXT_AT_MODEL, OMNI_THINKER_BLOCK_OUTPUT_RECORDED),
    "qwen3_omni_moe": (OMNI_TEXT_AT_THINKER_MODEL, OMNI_THINKER_BLOCK_OUTPUT_RECORDED),
    "aria": (ARIA_GEMM_EXPERTS,),
    "aria_text": (ARIA_GEMM_EXPERTS,),
    "openai_privacy_filter": (PRIVACY_FILTER_FIXED_CLAMP,),
    "granitemoe": (GRANITE_GROUPED,),
    "granitemoeshared": (GRANITE_GROUPED,),
    "granitemoehybrid": (GRANITE_GROUPED, GRANITE_HYBRID_ATTENTION_NAME),
}


def for_installed_release(entry: ArchEntry) -> ArchEntry:
    """``entry`` as the installed transformers release needs it: on 4.x its ``LEGACY_4X`` variant (a
    type without one is left as it is: ``versions.absent_reason`` reports it ``skip`` there), on 5.x
    every override whose range holds (the 4.x variant is the same when applied twice)."""
    if versions.installed().major < 5:
        legacy = LEGACY_4X.get(entry.model_type)
        return entry if legacy is None else apply_overrides(entry, legacy)
    for override in RELEASE_OVERRIDES.get(entry.model_type, ()):
        if in_releases(override.releases):
            entry = apply_overrides(entry, override.fields)
    return entry
