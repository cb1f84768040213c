"""Registry entries: shared experts and expert activations of other forms (data, not code; see core.py for
the shared tiny sizes and helpers).

The model types whose block needed a spec vocabulary added after the family files were written: a
non-gated relu² shared expert (NemotronH), clamped shared experts (GLM-5-Next: clamped SwiGLU; MiniMax-M3:
the GPT-OSS clamped activation), a concatenated expert-bias layout (OpenAI privacy filter), a block built
from a doubly nested sub-config (Qwen3-Omni's thinker text), and soft-capped SwiGLU experts (Inkling2).

Clamp limits and soft-caps are chosen so that the tiny O(1) pre-activations really reach them (an entry
whose spec omits the clamp or the cap fails), see ``CLAMP`` and ``SOFTCAP_*``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from moeconf.registry.config_space import FieldRule, Published
from moeconf.registry.core import (
    ATTENTION,
    FUSED_EXPERTS,
    SWITCH_AUX,
    E,
    H,
    I,
    K,
    S,
    router_probs_recorded,
    shared_mlp,
    softmax_topk,
)
from moeconf.registry.deepseek_family import BIASED_GATE, DS_SIZES, ROPE, TOKENS, kept_groups_xfail, sigmoid_router
from moeconf.registry.entry import ArchEntry, Binding, Expectation, sub_config_variant
from moeconf.registry.softmax_family import GATE, QWEN3_OMNI_THINKER
from moeconf.spec import ExpertSpec, LossSpec, MoESpec, RouterSpec, SharedSpec

RELU2 = ExpertSpec(activation="relu2", glu="none")
"""NemotronH's non-gated ``down(relu²(up(x)))`` MLP (routed and shared)."""

CLAMP = 3.0
"""``swiglu_limit`` of the clamped experts. GLM-5-Next and MiniMax-M3 read one limit for the routed *and* the
shared expert; the cases keep routed pre-activations 2 % away from the limit but not the shared ones, so
the limit sits in the tail of the N(0, 1) pre-activations: some exceed it (the clamp is exercised), very few
lie within bf16 rounding of it. Measured on seeds 0 and 1: 1-5 shared pre-activations per seed are clamped, the
nearest unclamped one lies 0.8 % of L from the edge (GLM-5-Next, seed 1), about 3 bf16 half-ulps. NOTE: other
seeds may put a shared value on the edge; only a shared-expert clamp margin in the cases would rule that out."""

ROUTED_CLAMP = 1.5
"""OpenAI-PF's ``swiglu_limit``: only routed experts clamp there, and those keep a 2 % margin from the limit,
so it can sit inside the bulk of the pre-activations."""

SOFTCAP_GATE, SOFTCAP_UP = 1.0, 1.5
"""Inkling2 ``mlp_gate_softcap`` / ``mlp_up_softcap``: of the order of the O(1) pre-activations, so the
tanh caps change the output by tens of percent (the defaults 4 / 25 barely bend them)."""

# --- NemotronH -------------------------------------------------------------------------------------------

NEMOTRON_H = dict(
    hidden_size=H,
    intermediate_size=48,
    moe_intermediate_size=I,
    moe_shared_expert_intermediate_size=S,
    n_routed_experts=E,
    num_experts_per_tok=K,
    n_shared_experts=1,
    n_group=2,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    mlp_hidden_act="relu2",
    mlp_bias=False,
    moe_latent_size=None,
    # The checkpoint's pattern string, not layers_block_type: the layer type names changed in 5.13.0 ("attention"
    # → "full_attention", "mamba" → "linear_attention"), "*E" means attention then MoE in every release.
    hybrid_override_pattern="*E",
    head_dim=8,
    use_mamba_kernels=False,
    **ATTENTION,
)
"""Layer 0 is the one attention layer, layer 1 the MoE; no latent projection (fc1/fc2 are identities)."""

# --- GLM-5-Next ----------------------------------------------------------------------------------------

GLM5_NEXT_TEXT = dict(
    **DS_SIZES,
    n_group=2,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=1.5,
    hidden_act="silu",
    swiglu_limit=CLAMP,
    mlp_layer_types=["sparse"],
    layer_types=["full_attention"],
    num_hidden_layers=1,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=0,
    qk_nope_head_dim=8,
    v_head_dim=8,
    index_topk=8,
    index_kpool=4,
    index_head_dim=8,
    index_n_heads=2,
    linear_head_dim=8,
    linear_num_heads=4,
    hc_mult=2,
    hc_sinkhorn_iters=2,
    pad_token_id=0,
    router_aux_loss_coef=0.02,
    output_router_logits=True,
    **ATTENTION,
)
"""GLM-5-Next text config: one DSA attention layer (NoPE: ``qk_rope_head_dim=0`` is required), one MoE."""

GLM5_NEXT_SPEC = dict(
    router=sigmoid_router(renorm=True, routed_scaling=1.5),
    experts=ExpertSpec(glu="clamped_swiglu", gptoss_limit=CLAMP),
    # Shared width = moe_intermediate_size × n_shared_experts; Glm5NextTextMLP clamps like the experts (its act is
    # hidden_act, silu here; the experts hard-code F.silu).
    shared=SharedSpec(I, mlp=ExpertSpec(glu="clamped_swiglu", gptoss_limit=CLAMP)),
)

# --- MiniMax-M3 -------------------------------------------------------------------------------------------

MINIMAX_M3_TEXT = dict(
    hidden_size=H,
    intermediate_size=I,
    shared_intermediate_size=S,
    dense_intermediate_size=48,
    num_local_experts=E,
    num_experts_per_tok=K,
    routed_scaling_factor=2.0,
    swiglu_alpha=1.702,
    swiglu_limit=CLAMP,
    router_jitter_noise=0.0,
    mlp_layer_types=["sparse"],
    layer_types=["full_attention"],
    num_hidden_layers=1,
    head_dim=8,
    rotary_dim=8,
    router_aux_loss_coef=0.02,
    output_router_logits=True,
    **TOKENS,
    **ATTENTION,
)
"""MiniMax-M3 text config: routed and shared experts both use the GPT-OSS clamped activation (α, L)."""

GPTOSS_CLAMPED = ExpertSpec(glu="gptoss_clamped", gptoss_alpha=1.702, gptoss_limit=CLAMP)

MINIMAX_M3_SPEC = dict(
    # Sigmoid + selection bias (router buffer), renormalised without eps; the block scales the routed output.
    router=RouterSpec(
        scoring="sigmoid",
        select_on="scores",
        selection_bias=True,
        weight_from="scores",
        renorm="always",
        routed_scaling=2.0,
        scaling_site="output",
    ),
    experts=GPTOSS_CLAMPED,
    shared=SharedSpec(S, mlp=GPTOSS_CLAMPED),
)

MINIMAX_M3_PARAMS = (
    BIASED_GATE
    + FUSED_EXPERTS
    + (
        Binding("shared_experts.gate_up_proj.weight", ("shared.w_gate", "shared.w_up"), "gate_up_rows"),
        Binding("shared_experts.down_proj.weight", ("shared.w_down",)),
    )
)

# --- Inkling2 -----------------------------------------------------------------------------------------------

INKLING2_TEXT = dict(
    hidden_size=H,
    moe_intermediate_size=I,
    n_routed_experts=E,
    num_experts_per_tok=K,
    route_scale=2.0,
    scoring_func="sigmoid",
    mlp_gate_softcap=SOFTCAP_GATE,
    mlp_up_softcap=SOFTCAP_UP,
    num_hidden_layers=1,
    layer_types=["hybrid_sliding"],
    head_dim=8,
    swa_num_attention_heads=4,
    swa_num_key_value_heads=4,
    swa_head_dim=8,
    sliding_window_size=8,
    d_rel=4,
    rel_extent=16,
    n_layers_per_attn_res_block=1,
    unpadded_vocab_size=128,
    pad_token_id=0,
    eos_token_id=1,
    **ATTENTION,
)
"""Inkling2 text config (one sliding-window layer)."""

INKLING2_SPEC = dict(
    # Sigmoid + selection bias, renormalised (+1e-20), weights × route_scale.
    router=RouterSpec(
        scoring="sigmoid",
        select_on="scores",
        selection_bias=True,
        weight_from="scores",
        renorm="always",
        renorm_eps=1e-20,
        routed_scaling=2.0,
    ),
    experts=ExpertSpec(glu="softcapped_swiglu", softcap_gate=SOFTCAP_GATE, softcap_up=SOFTCAP_UP),
)

INKLING2_LOOP_TEXT = dict(
    INKLING2_TEXT,
    num_hidden_layers=2,
    layer_types=["hybrid_sliding", "hybrid_sliding"],
    loop_layer_index_start=1,
    loop_layer_index_end=2,
    loop_num_passes=2,
    loop_gate_rank=4,
)
"""Inkling2-Loop text config: layer 0 plain, layer 1 looped twice."""

INKLING2_FIELDS = (
    FieldRule("scoring_func", "scoring"),
    FieldRule("mlp_gate_softcap", "softcap_gate"),
    FieldRule("mlp_up_softcap", "softcap_up"),
)
"""Inkling2's router score function (ACT2FN[scoring_func]) and its experts' softcaps."""

INKLING2_PARAMS = GATE + (Binding("gate.e_score_correction_bias", ("router.selection_bias",)),) + FUSED_EXPERTS

# --- OpenAI privacy filter ----------------------------------------------------------------------------------

PRIVACY_FILTER = dict(
    hidden_size=H,
    intermediate_size=I,
    num_local_experts=E,
    num_experts_per_tok=K,
    swiglu_alpha=1.702,
    swiglu_limit=ROUTED_CLAMP,
    num_hidden_layers=1,
    head_dim=8,
    sliding_window=8,
    rope_parameters=ROPE,
    **TOKENS,
    **ATTENTION,
)
"""OpenAI privacy filter: a bidirectional token-classification encoder; no aux loss (router_aux_loss_coef and
output_router_logits are config fields the model never reads)."""


GLM5_NEXT = ArchEntry(
    model_type="glm5_next",
    config_class="Glm5NextConfig",
    config_kwargs=dict(
        text_config=GLM5_NEXT_TEXT,
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=16,
            num_heads=2,
            patch_size=4,
            temporal_patch_size=2,
            spatial_merge_size=2,
            out_hidden_size=H,
            projection_intermediate_size=32,
        ),
    ),
    block_class="Glm5NextTextMoE",
    block_path="model.language_model.layers.0.mlp",
    model_class="Glm5NextForConditionalGeneration",
    block_config_attr="text_config",
    spec=MoESpec(E, K, H, I, **GLM5_NEXT_SPEC, losses=SWITCH_AUX),
    # one limit for the routed experts and the shared MLP (Glm5NextTextExperts, Glm5NextTextMLP)
    config_fields=(FieldRule("swiglu_limit", "swiglu_limit"), FieldRule("swiglu_limit", "shared_swiglu_limit")),
    params=BIASED_GATE + FUSED_EXPERTS + shared_mlp("shared_experts"),
    router_path="gate",
    experts_path="experts",
    aux_coef_attr="text_config.router_aux_loss_coef",
)

MINIMAX_M3_VL = ArchEntry(
    model_type="minimax_m3_vl",
    config_class="MiniMaxM3VLConfig",
    config_kwargs=dict(
        text_config=MINIMAX_M3_TEXT,
        vision_config=dict(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ),
        projector_hidden_size=32,
    ),
    block_class="MiniMaxM3VLSparseMoeBlock",
    block_path="model.language_model.layers.0.mlp",
    model_class="MiniMaxM3SparseForConditionalGeneration",
    block_config_attr="text_config",
    spec=MoESpec(E, K, H, I, **MINIMAX_M3_SPEC, losses=SWITCH_AUX),
    # one alpha and limit for the routed experts and the shared MiniMaxM3VLDenseMLP
    config_fields=(
        FieldRule("shared_intermediate_size", "shared_intermediate"),
        FieldRule("swiglu_limit", "swiglu_limit"),
        FieldRule("swiglu_limit", "shared_swiglu_limit"),
        FieldRule("swiglu_alpha", "swiglu_alpha"),
        FieldRule("swiglu_alpha", "shared_swiglu_alpha"),
    ),
    params=MINIMAX_M3_PARAMS,
    router_path="gate",
    experts_path="experts",
    aux_coef_attr="text_config.router_aux_loss_coef",
)

INKLING2_VISION = dict(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    patch_size=4,
    posemb_grid_size=4,
    projection_hidden_dim=32,
    text_hidden_size=H,
)
"""The one-layer Inkling-2 vision tower of both composites (only built, never run)."""

INKLING2_BLOCK_FIELDS: dict[str, Any] = dict(
    block_config_attr="text_config",
    spec=MoESpec(E, K, H, I, **INKLING2_SPEC),
    config_fields=INKLING2_FIELDS,
    params=INKLING2_PARAMS,
    router_path="gate",
    experts_path="experts",
)
"""The text MoE block's own fields, the same in ``inkling2`` and ``inkling2_loop``."""

INKLING2 = ArchEntry(
    model_type="inkling2",
    config_class="Inkling2Config",
    config_kwargs=dict(
        text_config=INKLING2_TEXT,
        vision_config=dict(INKLING2_VISION),
    ),
    block_class="Inkling2SparseMoeBlock",
    block_path="model.language_model.layers.0.mlp",
    model_class="Inkling2ForConditionalGeneration",
    **INKLING2_BLOCK_FIELDS,
)

INKLING2_LOOP = ArchEntry(
    model_type="inkling2_loop",
    config_class="Inkling2LoopConfig",
    config_kwargs=dict(
        text_config=INKLING2_LOOP_TEXT,
        vision_config=dict(model_type="inkling2_vision", **INKLING2_VISION),
    ),
    block_class="Inkling2LoopSparseMoeBlock",
    block_path="model.language_model.layers.0.mlp",
    model_class="Inkling2LoopForConditionalGeneration",
    **INKLING2_BLOCK_FIELDS,
)

ENTRIES: tuple[ArchEntry, ...] = (
    ArchEntry(
        model_type="nemotron_h",
        config_class="NemotronHConfig",
        config_kwargs=NEMOTRON_H,
        block_class="NemotronHMoE",
        block_path="model.layers.1.mixer",
        model_class="NemotronHForCausalLM",
        # DeepSeek-V3 router; non-gated relu² routed experts and an (always present) non-gated relu² shared MLP.
        spec=MoESpec(
            E,
            K,
            H,
            I,
            router=sigmoid_router(renorm=True, routed_scaling=2.5),
            experts=RELU2,
            shared=SharedSpec(S, mlp=RELU2),
        ),
        config_fields=(
            FieldRule("moe_shared_expert_intermediate_size", "shared_intermediate"),
            FieldRule(
                "n_shared_experts",
                None,
                why="NemotronHMoE sizes its one shared MLP by moe_shared_expert_intermediate_size alone "
                "(modeling_nemotron_h.py: NemotronHMLP(config, intermediate_size=...))",
            ),
        ),
        params=BIASED_GATE
        + (
            Binding("experts.up_proj", ("experts.w_up",)),
            Binding("experts.down_proj", ("experts.w_down",)),
            Binding("shared_experts.up_proj.weight", ("shared.w_up",)),
            Binding("shared_experts.down_proj.weight", ("shared.w_down",)),
        ),
        router_path="gate",
        experts_path="experts",
    ),
    GLM5_NEXT,
    # The text model has no loss (Glm5NextForConditionalGeneration adds the aux loss).
    sub_config_variant(
        GLM5_NEXT,
        model_type="glm5_next_text",
        config_class="Glm5NextTextConfig",
        block_path="layers.0.mlp",
        model_class="Glm5NextTextModel",
        spec=replace(GLM5_NEXT.spec, losses=LossSpec()),
        aux_coef_attr=None,
    ),
    MINIMAX_M3_VL,
    sub_config_variant(
        MINIMAX_M3_VL,
        model_type="minimax_m3_vl_text",
        config_class="MiniMaxM3VLTextConfig",
        block_path="model.layers.0.mlp",
        model_class="MiniMaxM3VLForCausalLM",
        aux_coef_attr="router_aux_loss_coef",
    ),
    ArchEntry(
        model_type="openai_privacy_filter",
        config_class="OpenAIPrivacyFilterConfig",
        config_kwargs=PRIVACY_FILTER,
        block_class="OpenAIPrivacyFilterMLP",
        block_path="layers.0.mlp",
        # A token-classification encoder: no aux loss.
        model_class="OpenAIPrivacyFilterModel",
        # GPT-OSS router (logit bias, top-k on logits, softmax over the k) returning w / k; the block multiplies
        # the routed output by k (num_experts_per_tok). Experts: GPT-OSS clamped activation, biases, fp32.
        spec=MoESpec(
            E,
            K,
            H,
            I,
            router=RouterSpec(
                scoring="softmax",
                logit_bias=True,
                select_on="logits",
                weight_from="softmax_of_selected_logits",
                routed_scaling=1 / K,
                output_scale=float(K),
            ),
            experts=ExpertSpec(glu="gptoss_clamped", bias=True, gptoss_alpha=1.702, gptoss_limit=ROUTED_CLAMP),
        ),
        config_fields=(
            FieldRule("num_experts_per_tok", "top_k"),
            FieldRule("swiglu_limit", "swiglu_limit"),
            FieldRule("swiglu_alpha", "swiglu_alpha"),
            # the router's w / k and the block's × k (OpenAIPrivacyFilterTopKRouter, OpenAIPrivacyFilterMLP)
            FieldRule("num_experts_per_tok", "per_k_scaling"),
        ),
        params=(
            Binding("router.weight", ("router.weight",)),
            Binding("router.bias", ("router.bias",)),
            Binding("experts.gate_up_proj", ("experts.w_gate", "experts.w_up"), "gate_up_cols"),
            Binding("experts.gate_up_proj_bias", ("experts.b_gate", "experts.b_up"), "gate_up_bias_cat"),
            Binding("experts.down_proj", ("experts.w_down",), "transposed"),
            Binding("experts.down_proj_bias", ("experts.b_down",)),
        ),
        router_path="router",
        experts_path="experts",
    ),
    ArchEntry(
        model_type="qwen3_omni_moe",
        config_class="Qwen3OmniMoeConfig",
        # enable_audio_output=False: no talker / code2wav. The default talker does not build: its text config has
        # no shared_expert_intermediate_size, which the talker's sparse block reads (transformers 5.24).
        config_kwargs=dict(thinker_config=QWEN3_OMNI_THINKER, enable_audio_output=False),
        block_class="Qwen3OmniMoeThinkerTextSparseMoeBlock",
        block_path="thinker.model.language_model.layers.0.mlp",
        model_class="Qwen3OmniMoeForConditionalGeneration",
        block_config_attr="thinker_config.text_config",
        # The thinker (Qwen3OmniMoeThinkerForConditionalGeneration) adds the aux loss.
        spec=MoESpec(E, K, H, I, router=softmax_topk(renorm="always"), losses=SWITCH_AUX),
        params=GATE + FUSED_EXPERTS,
        router_path="gate",
        experts_path="experts",
        aux_coef_attr="thinker_config.text_config.router_aux_loss_coef",
        published=(
            Published(
                "Qwen/Qwen3-Omni-30B-A3B-Instruct",
                {"num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True},
            ),
        ),
        expectations=(
            Expectation(
                "xfail",
                check="config_aux_loss",
                reason="upstream: Qwen3OmniMoeForConditionalGeneration defines no forward (only generate and "
                "talker helpers); the thinker adds the aux loss, but the composite model cannot be run with labels",
            ),
            # The config is built before anything runs, so no check can be reported.
            Expectation(
                "skip",
                reason="upstream: Qwen3OmniMoeTalkerCodePredictorConfig.__init__ reads self.use_sliding_window "
                "before anything sets it (5.0.0 configuration_qwen3_omni_moe.py:592), and Qwen3OmniMoeConfig "
                "always builds a talker config, which builds one (:909), so no Qwen3OmniMoeConfig can be constructed; "
                "fixed in 5.1.0",
                releases=">=5.0,<5.1",
            ),
        )
        + router_probs_recorded("5.0.0 modeling_qwen3_omni_moe.py:1448, Qwen3OmniMoeThinkerTextTopKRouter"),
    ),
)

INKLING2_ENTRIES: tuple[ArchEntry, ...] = (
    INKLING2,
    sub_config_variant(
        INKLING2,
        model_type="inkling2_text",
        config_class="Inkling2TextConfig",
        block_path="model.layers.0.mlp",
        model_class="Inkling2ForCausalLM",
    ),
    INKLING2_LOOP,
    sub_config_variant(
        INKLING2_LOOP,
        model_type="inkling2_loop_text",
        config_class="Inkling2LoopTextConfig",
        block_path="model.layers.0.mlp",
        model_class="Inkling2LoopForCausalLM",
    ),
)
"""Inkling2: bf16 runs because the backends keep ``_keep_in_fp32_modules_strict`` tensors (the router
weight) in fp32, as ``from_pretrained`` does; the router multiplies fp32 inputs by it."""

ENTRIES = ENTRIES + INKLING2_ENTRIES

KEPT_GROUPS_TOPK: dict[str, str] = {
    "nemotron_h": "modeling_nemotron_h.py:791",
    "glm5_next": "modeling_glm5_next.py:178",
    "glm5_next_text": "modeling_glm5_next.py:178",
}
"""Group-limited routers whose final top-k picks masked (-inf) experts when k exceeds the kept groups' experts."""

ENTRIES = tuple(
    replace(e, expectations=e.expectations + (kept_groups_xfail(KEPT_GROUPS_TOPK[e.model_type]),))
    if e.model_type in KEPT_GROUPS_TOPK
    else e
    for e in ENTRIES
)
