"""Registry entries: deepseek family (data, not code; see core.py for the shared tiny sizes and helpers).

DeepSeek-V3-style sigmoid routers (selection-only bias, group-limited top-k, renormalisation flag, routed
scaling) and the DeepSeek-V2 / Mistral-4 softmax + group-limited routers. Each entry sets the router
flags explicitly, and the entries vary them (renorm on/off, scaling in the weights or on the output,
group score top-2-sum/max, masked groups -inf/0.0, greedy) so that every path of the shared router
code is exercised somewhere. NemotronH and GLM-5-Next (shared experts of other forms) are in
extra_family.py.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from moeconf.registry.config_space import FieldRule, Published
from moeconf.registry.core import (
    ATTENTION,
    CORE_ENTRIES,
    FUSED_EXPERTS,
    SWITCH_AUX,
    WEIGHTING_CHECKS,
    E,
    H,
    I,
    K,
    S,
    shared_mlp,
)
from moeconf.registry.entry import ArchEntry, Binding, Expectation, sub_config_variant
from moeconf.spec import ExpertSpec, GroupLimit, LossSpec, MoESpec, RouterSpec, SharedSpec

GROUPS = GroupLimit(n_group=2, topk_group=1)
"""Two groups of four experts, one kept: the group stage really removes candidates."""

ZERO_FILL_GROUPS = replace(GROUPS, fill="zero")
"""``GROUPS`` with the masked groups filled with 0.0 instead of -inf (Mistral-4, AXK2)."""

GREEDY_GROUPS = replace(GROUPS, score="max", fill="zero")
"""DeepSeek-V2's ``group_limited_greedy``: group score = max, masked groups = 0.0."""

MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8)
"""Tiny multi-head latent attention."""

DSA = dict(index_topk=4, index_head_dim=8, index_n_heads=2)
"""Tiny DeepSeek sparse-attention indexer."""

TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
"""Special tokens inside the tiny vocabulary (several defaults point past it)."""

ROPE = {"rope_type": "default", "rope_theta": 10000.0}
"""Plain RoPE where the default is YaRN with factors meant for long contexts."""

DS_SIZES = dict(
    hidden_size=H,
    intermediate_size=48,
    moe_intermediate_size=I,
    n_routed_experts=E,
    num_experts_per_tok=K,
    n_shared_experts=1,
)
"""The tiny DeepSeek-style MoE sizes (E routed experts of width I, top-K, one shared expert, dense MLP 48 wide)
that open most configs here; the routing fields (groups, renormalisation, scaling) follow in each config."""

CLAMP = 3.0
"""``swiglu_limit`` of the clamped experts (HY-V4): N(0, 1) pre-activations exceed it a few times per
case, so the clamps really bite. NOTE: the cases keep routing margins but not clamp margins; a much
smaller limit puts bf16 values on the wrong side of ±L and fails bf16 gradients for lack of margin."""

GATE = (Binding("gate.weight", ("router.weight",)),)
BIASED_GATE = GATE + (Binding("gate.e_score_correction_bias", ("router.selection_bias",)),)
"""DeepSeek-V3 router: weight plus the float32 selection-only bias buffer."""

DSV3_BLOCK = BIASED_GATE + FUSED_EXPERTS + shared_mlp("shared_experts")
"""DeepSeek-V3-style block: biased router, fused experts, gate/up/down ``shared_experts``."""

DSV2_BLOCK = GATE + FUSED_EXPERTS + shared_mlp("shared_experts")
"""DeepSeek-V2 / Mistral-4 block: router without bias, fused experts, ``shared_experts``."""

DSV3_FIELDS: dict[str, Any] = dict(params=DSV3_BLOCK, router_path="gate", experts_path="experts")
"""The bindings and module names of a ``DSV3_BLOCK`` (router ``gate``, experts ``experts``)."""

DSV2_FIELDS: dict[str, Any] = dict(params=DSV2_BLOCK, router_path="gate", experts_path="experts")
"""The bindings and module names of a ``DSV2_BLOCK`` (router ``gate``, experts ``experts``)."""


def sigmoid_router(
    *,
    renorm: bool,
    routed_scaling: float,
    group_limit: GroupLimit | None = GROUPS,
    scaling_site: Literal["weights", "output"] = "weights",
) -> RouterSpec:
    """R3 DeepSeek-V3: sigmoid scores, selection on scores + bias (group-limited), weights = unbiased
    scores, renormalised ``/ (Σ + 1e-20)`` iff ``renorm``, times ``routed_scaling`` (in the weights or on
    the output, ``scaling_site``)."""
    return RouterSpec(
        scoring="sigmoid",
        select_on="scores",
        selection_bias=True,
        weight_from="scores",
        renorm="always" if renorm else "never",
        renorm_eps=1e-20,
        group_limit=group_limit,
        routed_scaling=routed_scaling,
        scaling_site=scaling_site,
    )


def softmax_group_router(*, renorm: bool, routed_scaling: float, group_limit: GroupLimit | None) -> RouterSpec:
    """R6 DeepSeek-V2 / Mistral-4: softmax scores, (group-limited) top-k on them, weights = scores,
    renormalised ``/ (Σ + 1e-20)`` iff ``renorm``, times ``routed_scaling``."""
    return RouterSpec(
        scoring="softmax",
        select_on="scores",
        weight_from="scores",
        renorm="always" if renorm else "never",
        renorm_eps=1e-20,
        group_limit=group_limit,
        routed_scaling=routed_scaling,
    )


GLM4V_TEXT = dict(
    **DS_SIZES,
    n_group=2,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=1.5,
    hidden_act="silu",
    # head_dim 128: the default mrope_section [8, 12, 12] needs a rotary half-width of 32 (partial factor 0.5).
    first_k_dense_replace=0,
    num_hidden_layers=1,
    head_dim=128,
    router_aux_loss_coef=0.02,
    output_router_logits=True,
    **ATTENTION,
)
DOTS3_TEXT = dict(
    hidden_size=H,
    intermediate_size=48,
    moe_intermediate_size=I,
    n_routed_experts=E,
    num_experts_per_tok=K,
    shared_experts_intermediate_size=S,
    n_shared_experts=1,
    n_group=2,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.0,
    hidden_act="silu",
    mlp_layer_types=["sparse"],
    num_hidden_layers=1,
    **MLA,
    **DSA,
    **TOKENS,
    **ATTENTION,
)
HYV4_TEXT = dict(
    **DS_SIZES,
    n_group=2,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.827,
    hidden_act="silu",
    swiglu_limit=CLAMP,
    mlp_layer_types=["sparse"],
    num_hidden_layers=1,
    **MLA,
    **DSA,
    **TOKENS,
    **ATTENTION,
)
HYV4VL_TEXT = dict(HYV4_TEXT, rope_parameters={**ROPE, "mrope_section": [2, 1, 1]})  # sums to qk_rope_head_dim // 2
OCR2_TEXT = dict(
    **DS_SIZES,
    topk_method="group_limited_greedy",
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.0,
    hidden_act="silu",
    mlp_layer_types=["sparse"],
    num_hidden_layers=1,
    **ATTENTION,
)
UNLIMITED_OCR_TEXT = dict(
    **DS_SIZES,
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    routed_scaling_factor=1.5,
    hidden_act="silu",
    mlp_layer_types=["sparse"],
    num_hidden_layers=1,
    **ATTENTION,
)
LARGE4_TEXT = dict(
    **DS_SIZES,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=1.5,
    hidden_act="silu",
    mlp_layer_types=["sparse"],
    num_hidden_layers=1,
    rope_parameters=ROPE,
    **MLA,
    **DSA,
    **ATTENTION,
)
"""Text configs (of ``hy_v4`` and of the composite model types, whose ``*_text`` variants reuse them)."""

HYV4_SPEC = MoESpec(
    E,
    K,
    H,
    I,
    router=sigmoid_router(renorm=True, routed_scaling=2.827),
    experts=ExpertSpec(glu="clamped_swiglu", gptoss_limit=CLAMP),
    shared=SharedSpec(I),
)
"""HY-V4 block: routed experts act(min(gate, L))·clamp(up, ±L), act = silu hard-coded in HYV4Experts._apply_gate."""

HYV4_FIELDS = (FieldRule("swiglu_limit", "swiglu_limit"),)
"""HY-V4 clamps the routed experts only (HYV4MLP, the shared expert, reads no swiglu_limit)."""

SAM_VISION = dict(
    hidden_size=32,
    output_channels=16,
    num_hidden_layers=1,
    num_attention_heads=4,
    image_size=64,
    patch_size=16,
    global_attn_indexes=(0,),
    window_size=2,
    mlp_dim=32,
    downsample_channels=[16, 32],
)
"""Tiny SAM tower of the DeepSeek-OCR-2 / Unlimited-OCR vision encoder."""

OCR_ENCODER = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4)
"""The one-layer encoder sizes that both OCR vision encoders' ``encoder_config`` start with."""

DSV2_NORM_IGNORED = (
    "upstream: DeepseekV2TopkRouter (transformers/models/deepseek_v2/modeling_deepseek_v2.py) never reads the "
    "documented config.norm_topk_prob (modular_deepseek_v2.py: `del self.norm_topk_prob`), so the top-k weights "
    "are never renormalised"
)


def kept_groups_xfail(where: str, *, fill: str = "-inf") -> Expectation:
    """``invalid:kept`` (k beyond the experts of the kept groups): the router fills the masked groups' scores
    with ``fill`` and ``torch.topk`` then picks masked experts; neither the config class nor the block checks k."""
    return Expectation(
        "xfail",
        f"upstream: num_experts_per_tok larger than topk_group × (E / n_group) is accepted: the masked groups are "
        f"filled with {fill} and torch.topk picks masked experts ({where} in transformers 5.24), no check rejects it",
        check="config_rejects_invalid",
        config="invalid:kept",
    )


KEPT_GROUPS_TOPK: dict[str, tuple[str, str]] = {
    "deepseek_v2": ("modeling_deepseek_v2.py:115", "0.0"),
    "deepseek_v32": ("modeling_deepseek_v32.py:530", "-inf"),
    "glm_moe_dsa": ("modeling_glm_moe_dsa.py:503", "-inf"),
    "glm4_moe": ("modeling_glm4_moe.py:301", "-inf"),
    "sarvam_moe": ("modeling_glm4_moe.py:301", "-inf"),
    "glm4v_moe": ("modeling_glm4v_moe.py:303", "-inf"),
    "glm4v_moe_text": ("modeling_glm4v_moe.py:303", "-inf"),
    "dots3_note": ("modeling_dots3_note.py:333", "-inf"),
    "dots3_note_text": ("modeling_dots3_note.py:333", "-inf"),
    "hy_v4_vl": ("modeling_hy_v4_vl.py:496", "-inf"),
    "hy_v4_vl_text": ("modeling_hy_v4_vl.py:496", "-inf"),
    "hy_v4": ("modeling_hy_v4.py:533", "-inf"),
    "deepseek_ocr2": ("modeling_deepseek_ocr2.py:1168", "0.0"),
    "deepseek_ocr2_text": ("modeling_deepseek_ocr2.py:1168", "0.0"),
    "mistral_large4": ("modeling_mistral_large4.py:550", "0.0"),
    "mistral_large4_text": ("modeling_mistral_large4.py:550", "0.0"),
    "glm4_moe_lite": ("modeling_glm4_moe_lite.py:407", "-inf"),
    "dots1": ("modeling_dots1.py:304", "-inf"),
    "kimi_linear": ("modeling_kimi_linear.py:751", "-inf"),
    "bailing_hybrid": ("modeling_bailing_hybrid.py:821", "-inf"),
    "solar_open": ("modeling_solar_open.py:135", "-inf"),
    "axk1": ("modeling_axk1.py:166", "-inf"),
    "axk2": ("modeling_axk2.py:304", "0.0"),
    "mimo_v2_flash": ("modeling_mimo_v2_flash.py:161", "-inf"),
    "exaone_moe": ("modeling_exaone_moe.py:260", "-inf"),
    "beam": ("modeling_beam.py:369", "-inf"),
    "mistral4": ("modeling_mistral4.py:161", "0.0"),
}
"""Where each group-limited router's final top-k picks from the masked scores (model type → file:line, fill)."""


DEEPSEEK_V3 = next(entry for entry in CORE_ENTRIES if entry.model_type == "deepseek_v3")

DEEPSEEK_V32 = ArchEntry(
    model_type="deepseek_v32",
    config_class="DeepseekV32Config",
    config_kwargs=dict(
        **DS_SIZES,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        hidden_act="silu",
        first_k_dense_replace=0,
        mlp_layer_types=["sparse"],
        num_hidden_layers=1,
        **MLA,
        **DSA,
        **ATTENTION,
    ),
    block_class="DeepseekV32MoE",
    block_path="model.layers.0.mlp",
    model_class="DeepseekV32ForCausalLM",
    spec=MoESpec(E, K, H, I, router=sigmoid_router(renorm=True, routed_scaling=2.5), shared=SharedSpec(I)),
    **DSV3_FIELDS,
    published=(
        Published(
            "deepseek-ai/DeepSeek-V3.2-Exp",
            {
                "n_routed_experts": 256,
                "num_experts_per_tok": 8,
                "n_group": 8,
                "topk_group": 4,
                "routed_scaling_factor": 2.5,
                "norm_topk_prob": True,
                "n_shared_experts": 1,
            },
        ),
    ),
)

GLM4_MOE = ArchEntry(
    model_type="glm4_moe",
    config_class="Glm4MoeConfig",
    config_kwargs=dict(
        **DS_SIZES,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.5,
        hidden_act="silu",
        first_k_dense_replace=0,
        num_hidden_layers=1,
        head_dim=8,
        **ATTENTION,
    ),
    block_class="Glm4MoeMoE",
    block_path="model.layers.0.mlp",
    model_class="Glm4MoeForCausalLM",
    spec=MoESpec(E, K, H, I, router=sigmoid_router(renorm=True, routed_scaling=1.5), shared=SharedSpec(I)),
    **DSV3_FIELDS,
    published=(
        Published(
            "zai-org/GLM-4.5",
            {
                "n_routed_experts": 160,
                "num_experts_per_tok": 8,
                "n_group": 1,
                "topk_group": 1,
                "routed_scaling_factor": 2.5,
                "norm_topk_prob": True,
                "n_shared_experts": 1,
            },
        ),
        Published(
            "zai-org/GLM-4.5-Air",
            {
                "n_routed_experts": 128,
                "num_experts_per_tok": 8,
                "n_group": 1,
                "topk_group": 1,
                "routed_scaling_factor": 1.0,
                "norm_topk_prob": True,
                "n_shared_experts": 1,
            },
        ),
    ),
)

GLM4V_MOE = ArchEntry(
    model_type="glm4v_moe",
    config_class="Glm4vMoeConfig",
    config_kwargs=dict(
        text_config=dict(GLM4V_TEXT),
        vision_config=dict(depth=1, hidden_size=32, num_heads=4, intermediate_size=32, out_hidden_size=H),
    ),
    block_class="Glm4vMoeTextMoE",
    block_path="model.language_model.layers.0.mlp",
    model_class="Glm4vMoeForConditionalGeneration",
    block_config_attr="text_config",
    # Glm4vMoeForConditionalGeneration adds text_config.router_aux_loss_coef × load_balancing_loss_func.
    spec=MoESpec(
        E, K, H, I, router=sigmoid_router(renorm=True, routed_scaling=1.5), shared=SharedSpec(I), losses=SWITCH_AUX
    ),
    **DSV3_FIELDS,
    aux_coef_attr="text_config.router_aux_loss_coef",
    published=(
        Published(
            "zai-org/GLM-4.5V",
            {
                "n_routed_experts": 128,
                "num_experts_per_tok": 8,
                "n_group": 1,
                "topk_group": 1,
                "routed_scaling_factor": 1.0,
                "norm_topk_prob": True,
                "n_shared_experts": 1,
            },
        ),
    ),
)

DOTS3_NOTE = ArchEntry(
    model_type="dots3_note",
    config_class="Dots3NoteConfig",
    # Vision tower kept dense (its MoE is a different, R4 block); shared width is configurable here.
    config_kwargs=dict(
        text_config=dict(DOTS3_TEXT),
        vision_config=dict(
            num_hidden_layers=1,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=32,
            mlp_layer_types=["dense"],
            adapter_in_dim=32,
            adapter_out_dim=H,
        ),
        audio_config=dict(
            num_hidden_layers=1,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=32,
            downsample_hidden_size=16,
            adapter_input_size=32,
            adapter_out_dim=H,
        ),
    ),
    block_class="Dots3NoteTextMoE",
    block_path="model.language_model.layers.0.mlp",
    model_class="Dots3NoteForConditionalGeneration",
    block_config_attr="text_config",
    spec=MoESpec(E, K, H, I, router=sigmoid_router(renorm=True, routed_scaling=2.0), shared=SharedSpec(S)),
    # modeling_dots3_note.py: shared MLP of shared_experts_intermediate_size × n_shared_experts
    config_fields=(FieldRule("n_shared_experts", "shared_multiple", per="shared_experts_intermediate_size"),),
    **DSV3_FIELDS,
)

HY_V4_VL = ArchEntry(
    model_type="hy_v4_vl",
    config_class="HYV4VLConfig",
    config_kwargs=dict(
        text_config=dict(HYV4VL_TEXT),
        vision_config=dict(
            num_hidden_layers=1,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=32,
            out_hidden_size=H,
            patch_size=16,
        ),
    ),
    block_class="HYV4VLMoE",
    block_path="model.language_model.layers.0.mlp",
    model_class="HYV4VLForConditionalGeneration",
    block_config_attr="text_config",
    spec=HYV4_SPEC,
    config_fields=HYV4_FIELDS,
    **DSV3_FIELDS,
)

DEEPSEEK_OCR2 = ArchEntry(
    model_type="deepseek_ocr2",
    config_class="DeepseekOcr2Config",
    # Text side = DeepSeek-V2 MoE (group_limited_greedy: group score = max, masked groups = 0.0); this config
    # has no norm_topk_prob, so "never renormalise" is what it describes.
    config_kwargs=dict(
        text_config=dict(OCR2_TEXT),
        vision_config=dict(
            sam_config=dict(SAM_VISION),
            encoder_config=dict(OCR_ENCODER, num_key_value_heads=4, vocab_size=128),
        ),
    ),
    block_class="DeepseekOcr2TextMoe",
    block_path="model.language_model.layers.0.mlp",
    model_class="DeepseekOcr2ForConditionalGeneration",
    block_config_attr="text_config",
    spec=MoESpec(
        E,
        K,
        H,
        I,
        router=softmax_group_router(renorm=False, routed_scaling=2.0, group_limit=GREEDY_GROUPS),
        shared=SharedSpec(I),
    ),
    config_fields=(FieldRule("topk_method", "topk_method"),),
    **DSV2_FIELDS,
)

UNLIMITED_OCR = ArchEntry(
    model_type="unlimited_ocr",
    config_class="UnlimitedOcrConfig",
    # topk_method="greedy": plain top-k of the softmax (the group-limited path is covered by deepseek_ocr2).
    config_kwargs=dict(
        text_config=dict(UNLIMITED_OCR_TEXT),
        vision_config=dict(
            sam_config=dict(SAM_VISION),
            encoder_config=dict(OCR_ENCODER, image_size=28, patch_size=14),
        ),
    ),
    block_class="UnlimitedOcrTextMoe",
    block_path="model.language_model.layers.0.mlp",
    model_class="UnlimitedOcrForConditionalGeneration",
    block_config_attr="text_config",
    spec=MoESpec(
        E,
        K,
        H,
        I,
        router=softmax_group_router(renorm=False, routed_scaling=1.5, group_limit=None),
        shared=SharedSpec(I),
    ),
    **DSV2_FIELDS,
)

MISTRAL_LARGE4 = ArchEntry(
    model_type="mistral_large4",
    config_class="MistralLarge4Config",
    # fp32 router; renormalisation is unconditional (the config has no norm_topk_prob).
    config_kwargs=dict(
        text_config=dict(LARGE4_TEXT),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            head_dim=8,
            image_size=32,
            patch_size=16,
        ),
    ),
    block_class="MistralLarge4TextMoE",
    block_path="model.language_model.layers.0.mlp",
    model_class="MistralLarge4ForConditionalGeneration",
    block_config_attr="text_config",
    spec=MoESpec(
        E,
        K,
        H,
        I,
        router=softmax_group_router(renorm=True, routed_scaling=1.5, group_limit=ZERO_FILL_GROUPS),
        shared=SharedSpec(I),
    ),
    **DSV2_FIELDS,
)


ENTRIES: tuple[ArchEntry, ...] = (
    DEEPSEEK_V32,
    GLM4_MOE,
    ArchEntry(
        model_type="glm4_moe_lite",
        config_class="Glm4MoeLiteConfig",
        # norm_topk_prob=False: the un-renormalised path of the shared DeepSeek-V3 router.
        config_kwargs=dict(
            **DS_SIZES,
            n_group=2,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.8,
            hidden_act="silu",
            mlp_layer_types=["sparse"],
            num_hidden_layers=1,
            **MLA,
            **ATTENTION,
        ),
        block_class="Glm4MoeLiteMoE",
        block_path="model.layers.0.mlp",
        model_class="Glm4MoeLiteForCausalLM",
        spec=MoESpec(E, K, H, I, router=sigmoid_router(renorm=False, routed_scaling=1.8), shared=SharedSpec(I)),
        **DSV3_FIELDS,
    ),
    # GLM-5: the DeepSeek-V3.2 block and tiny config under GLM's classes.
    replace(
        DEEPSEEK_V32,
        model_type="glm_moe_dsa",
        config_class="GlmMoeDsaConfig",
        # replace() keeps DeepSeek-V3.2's module: name GLM-5's (not derived here)
        modeling_module="transformers.models.glm_moe_dsa.modeling_glm_moe_dsa",
        block_class="GlmMoeDsaMoE",
        model_class="GlmMoeDsaForCausalLM",
        published=(),  # DeepSeek-V3.2's checkpoints are not GLM-5's
    ),
    ArchEntry(
        model_type="dots1",
        config_class="Dots1Config",
        # norm_topk_prob=False (the config default) keeps the un-renormalised path covered.
        config_kwargs=dict(
            **DS_SIZES,
            n_group=2,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=2.0,
            hidden_act="silu",
            first_k_dense_replace=0,
            num_hidden_layers=1,
            head_dim=8,
            **ATTENTION,
        ),
        block_class="Dots1MoE",
        block_path="model.layers.0.mlp",
        model_class="Dots1ForCausalLM",
        spec=MoESpec(E, K, H, I, router=sigmoid_router(renorm=False, routed_scaling=2.0), shared=SharedSpec(I)),
        **DSV3_FIELDS,
    ),
    ArchEntry(
        model_type="kimi_linear",
        config_class="KimiLinearConfig",
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=48,
            moe_intermediate_size=I,
            num_experts=E,
            num_experts_per_token=K,
            num_shared_experts=1,
            num_expert_group=2,
            topk_group=1,
            moe_renormalize=True,
            routed_scaling_factor=2.446,
            hidden_act="silu",
            mlp_layer_types=["sparse"],
            num_hidden_layers=1,
            **MLA,
            **TOKENS,
            **ATTENTION,
        ),
        block_class="KimiLinearMoE",
        block_path="model.layers.0.mlp",
        model_class="KimiLinearForCausalLM",
        spec=MoESpec(E, K, H, I, router=sigmoid_router(renorm=True, routed_scaling=2.446), shared=SharedSpec(I)),
        **DSV3_FIELDS,
        published=(
            Published(
                "moonshotai/Kimi-Linear-48B-A3B-Instruct",
                {
                    "num_experts": 256,
                    "num_experts_per_token": 8,
                    "num_shared_experts": 1,
                    "moe_renormalize": True,
                    "routed_scaling_factor": 2.446,
                },
            ),
        ),
    ),
    ArchEntry(
        model_type="bailing_hybrid",
        config_class="BailingHybridConfig",
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=48,
            moe_intermediate_size=I,
            num_experts=E,
            num_experts_per_token=K,
            num_shared_experts=1,
            num_expert_group=2,
            topk_group=1,
            moe_renormalize=True,
            routed_scaling_factor=2.5,
            hidden_act="silu",
            first_k_dense_replace=0,
            mlp_layer_types=["sparse"],
            num_hidden_layers=1,
            **MLA,
            **TOKENS,
            **ATTENTION,
        ),
        block_class="BailingHybridMoE",
        block_path="model.layers.0.mlp",
        model_class="BailingHybridForCausalLM",
        spec=MoESpec(E, K, H, I, router=sigmoid_router(renorm=True, routed_scaling=2.5), shared=SharedSpec(I)),
        **DSV3_FIELDS,
    ),
    ArchEntry(
        model_type="solar_open",
        config_class="SolarOpenConfig",
        config_kwargs=dict(
            hidden_size=H,
            moe_intermediate_size=I,
            n_routed_experts=E,
            num_experts_per_tok=K,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=1.5,
            hidden_act="silu",
            num_hidden_layers=1,
            head_dim=8,
            **ATTENTION,
        ),
        block_class="SolarOpenMoE",
        block_path="model.layers.0.mlp",
        model_class="SolarOpenForCausalLM",
        spec=MoESpec(E, K, H, I, router=sigmoid_router(renorm=True, routed_scaling=1.5), shared=SharedSpec(I)),
        **DSV3_FIELDS,
    ),
    ArchEntry(
        model_type="axk1",
        config_class="AXK1Config",
        # The block ends with its own RMSNorm (post_mlp_layernorm) on routed + shared output.
        config_kwargs=dict(
            **DS_SIZES,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            hidden_act="silu",
            mlp_layer_types=["sparse"],
            num_hidden_layers=1,
            rms_norm_eps=1e-6,
            **MLA,
            **TOKENS,
            **ATTENTION,
        ),
        block_class="AXK1MoE",
        block_path="model.layers.0.mlp",
        model_class="AXK1ForCausalLM",
        spec=MoESpec(
            E,
            K,
            H,
            I,
            router=sigmoid_router(renorm=True, routed_scaling=2.5),
            shared=SharedSpec(I),
            output_norm_eps=1e-6,
        ),
        params=DSV3_BLOCK + (Binding("post_mlp_layernorm.weight", ("output_norm.weight",)),),
        router_path="gate",
        experts_path="experts",
    ),
    ArchEntry(
        model_type="axk2",
        config_class="AXK2Config",
        # AXK2 fills the masked groups with 0.0, not -inf (intentional upstream, "to match reference").
        config_kwargs=dict(
            **DS_SIZES,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            hidden_act="silu",
            mlp_layer_types=["sparse"],
            num_hidden_layers=1,
            gated_norm_rank=4,
            **MLA,
            **DSA,
            **TOKENS,
            **ATTENTION,
        ),
        block_class="AXK2MoE",
        block_path="model.layers.0.mlp",
        model_class="AXK2ForCausalLM",
        spec=MoESpec(
            E,
            K,
            H,
            I,
            router=sigmoid_router(renorm=True, routed_scaling=2.5, group_limit=ZERO_FILL_GROUPS),
            shared=SharedSpec(I),
        ),
        **DSV3_FIELDS,
    ),
    ArchEntry(
        model_type="mimo_v2_flash",
        config_class="MiMoV2FlashConfig",
        # No shared experts in this block.
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=48,
            moe_intermediate_size=I,
            n_routed_experts=E,
            num_experts_per_tok=K,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=1.5,
            hidden_act="silu",
            mlp_layer_types=["sparse"],
            num_hidden_layers=1,
            head_dim=8,
            v_head_dim=8,
            **ATTENTION,
        ),
        block_class="MiMoV2FlashMoE",
        block_path="model.layers.0.mlp",
        model_class="MiMoV2FlashForCausalLM",
        spec=MoESpec(E, K, H, I, router=sigmoid_router(renorm=True, routed_scaling=1.5)),
        params=BIASED_GATE + FUSED_EXPERTS,
        router_path="gate",
        experts_path="experts",
    ),
    ArchEntry(
        model_type="hy_v4",
        config_class="HYV4Config",
        config_kwargs=HYV4_TEXT,
        block_class="HYV4MoE",
        block_path="model.layers.0.mlp",
        model_class="HYV4ForCausalLM",
        spec=HYV4_SPEC,
        config_fields=HYV4_FIELDS,
        **DSV3_FIELDS,
    ),
    ArchEntry(
        model_type="exaone_moe",
        config_class="ExaoneMoeConfig",
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=48,
            moe_intermediate_size=I,
            num_experts=E,
            num_experts_per_tok=K,
            num_shared_experts=1,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            hidden_act="silu",
            first_k_dense_replace=0,
            mlp_layer_types=["sparse"],
            num_hidden_layers=1,
            head_dim=8,
            **ATTENTION,
        ),
        block_class="ExaoneMoeSparseMoEBlock",
        block_path="model.layers.0.mlp",
        model_class="ExaoneMoeForCausalLM",
        spec=MoESpec(E, K, H, I, router=sigmoid_router(renorm=True, routed_scaling=2.5), shared=SharedSpec(I)),
        config_fields=(FieldRule("num_shared_experts", "shared_multiple"),),
        **DSV3_FIELDS,
    ),
    ArchEntry(
        model_type="beam",
        config_class="BeamConfig",
        # routed_scaling_factor multiplies the aggregated routed output in BeamMoE, not the weights.
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=48,
            moe_intermediate_size=I,
            num_experts=E,
            num_experts_per_tok=K,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            hidden_act="silu",
            mlp_layer_types=["sparse"],
            num_hidden_layers=1,
            head_dim=8,
            **ATTENTION,
        ),
        block_class="BeamMoE",
        block_path="model.layers.0.mlp",
        model_class="BeamForCausalLM",
        spec=MoESpec(E, K, H, I, router=sigmoid_router(renorm=True, routed_scaling=2.5, scaling_site="output")),
        params=BIASED_GATE + FUSED_EXPERTS,
        router_path="gate",
        experts_path="experts",
    ),
    # Alias type: runs transformers' DeepSeek-V3 classes (core.py's deepseek_v3 block).
    replace(
        DEEPSEEK_V3,
        model_type="sarvam_mla",
        config_class="SarvamMLAConfig",
        published=(),  # DeepSeek-V3's checkpoints are not Sarvam's
        config_kwargs=dict(
            **DS_SIZES,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            hidden_act="silu",
            first_k_dense_replace=0,
            num_hidden_layers=1,
            **MLA,
            **ATTENTION,
        ),
    ),
    # Alias type: runs transformers' GLM-4-MoE classes. norm_topk_prob=False covers the flag's off path.
    replace(
        GLM4_MOE,
        model_type="sarvam_moe",
        config_class="SarvamMoEConfig",
        config_kwargs=dict(GLM4_MOE.config_kwargs, norm_topk_prob=False, routed_scaling_factor=2.5),
        spec=MoESpec(E, K, H, I, router=sigmoid_router(renorm=False, routed_scaling=2.5), shared=SharedSpec(I)),
        published=(),  # GLM-4.5's checkpoints are not Sarvam's
    ),
    ArchEntry(
        model_type="mistral4",
        config_class="Mistral4Config",
        # Softmax in the model dtype, group score = sum of top-2, masked groups filled with 0.0.
        config_kwargs=dict(
            **DS_SIZES,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=1.5,
            hidden_act="silu",
            first_k_dense_replace=0,
            num_hidden_layers=1,
            **MLA,
            rope_parameters=ROPE,
            **ATTENTION,
        ),
        block_class="Mistral4MoE",
        block_path="model.layers.0.mlp",
        model_class="Mistral4ForCausalLM",
        spec=MoESpec(
            E,
            K,
            H,
            I,
            router=softmax_group_router(renorm=True, routed_scaling=1.5, group_limit=ZERO_FILL_GROUPS),
            shared=SharedSpec(I),
        ),
        **DSV2_FIELDS,
    ),
    ArchEntry(
        model_type="deepseek_v2",
        config_class="DeepseekV2Config",
        # norm_topk_prob=True is documented ("Whether to normalize the weights of the routed experts") but
        # DeepseekV2TopkRouter.forward never reads it: the spec renormalises, the block does not.
        config_kwargs=dict(
            **DS_SIZES,
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.0,
            hidden_act="silu",
            first_k_dense_replace=0,
            num_hidden_layers=1,
            **MLA,
            **ATTENTION,
        ),
        block_class="DeepseekV2Moe",
        block_path="model.layers.0.mlp",
        model_class="DeepseekV2ForCausalLM",
        spec=MoESpec(
            E,
            K,
            H,
            I,
            router=softmax_group_router(renorm=True, routed_scaling=2.0, group_limit=GREEDY_GROUPS),
            shared=SharedSpec(I),
        ),
        config_fields=(FieldRule("topk_method", "topk_method"),),
        **DSV2_FIELDS,
        published=(
            Published(
                "deepseek-ai/DeepSeek-V2",
                {
                    "n_routed_experts": 160,
                    "num_experts_per_tok": 6,
                    "n_shared_experts": 2,
                    "topk_method": "group_limited_greedy",
                    "n_group": 8,
                    "topk_group": 3,
                    "routed_scaling_factor": 16.0,
                    "norm_topk_prob": False,
                },
            ),
            Published(
                "deepseek-ai/DeepSeek-V2-Lite",
                {
                    "n_routed_experts": 64,
                    "num_experts_per_tok": 6,
                    "n_shared_experts": 2,
                    "topk_method": "greedy",
                    "n_group": 1,
                    "topk_group": 1,
                    "routed_scaling_factor": 1.0,
                    "norm_topk_prob": False,
                },
            ),
        ),
        expectations=(
            Expectation(
                "skip",
                "upstream: DeepseekV2Moe.route_tokens_to_experts reads self.num_experts, which __init__ never sets, "
                "on the topk_method='group_limited_greedy' path (5.6.2 modeling_deepseek_v2.py:113), so every "
                "forward of a group-limited DeepSeek-V2 raises AttributeError; fixed in 5.13.0",
                releases=">=5.0,<5.13",
            ),
        )
        + tuple(
            Expectation("xfail", DSV2_NORM_IGNORED, check=check, when=(("norm_topk_prob", True),))
            for check in WEIGHTING_CHECKS
        ),
    ),
    GLM4V_MOE,
    # The text model has no loss of its own (the aux loss lives in the composite's ForConditionalGeneration).
    sub_config_variant(
        GLM4V_MOE,
        model_type="glm4v_moe_text",
        config_class="Glm4vMoeTextConfig",
        block_path="layers.0.mlp",
        model_class="Glm4vMoeTextModel",
        spec=replace(GLM4V_MOE.spec, losses=LossSpec()),
        aux_coef_attr=None,
    ),
    DOTS3_NOTE,
    sub_config_variant(
        DOTS3_NOTE,
        model_type="dots3_note_text",
        config_class="Dots3NoteTextConfig",
        block_path="model.layers.0.mlp",
        model_class="Dots3NoteForCausalLM",
    ),
    HY_V4_VL,
    sub_config_variant(
        HY_V4_VL,
        model_type="hy_v4_vl_text",
        config_class="HYV4VLTextConfig",
        block_path="layers.0.mlp",
        model_class="HYV4VLTextModel",
    ),
    DEEPSEEK_OCR2,
    sub_config_variant(
        DEEPSEEK_OCR2,
        model_type="deepseek_ocr2_text",
        config_class="DeepseekOcr2TextConfig",
        block_path="layers.0.mlp",
        model_class="DeepseekOcr2TextModel",
    ),
    UNLIMITED_OCR,
    sub_config_variant(
        UNLIMITED_OCR,
        model_type="unlimited_ocr_text",
        config_class="UnlimitedOcrTextConfig",
        block_path="layers.0.mlp",
        model_class="UnlimitedOcrTextModel",
    ),
    MISTRAL_LARGE4,
    sub_config_variant(
        MISTRAL_LARGE4,
        model_type="mistral_large4_text",
        config_class="MistralLarge4TextConfig",
        block_path="layers.0.mlp",
        model_class="MistralLarge4TextModel",
    ),
)

ENTRIES = tuple(
    replace(e, expectations=e.expectations + (kept_groups_xfail(kept[0], fill=kept[1]),))
    if (kept := KEPT_GROUPS_TOPK.get(e.model_type))
    else e
    for e in ENTRIES
)
