"""Registry entries: softmax family (data, not code; see core.py for the shared tiny sizes and helpers)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from moeconf.registry.config_space import FieldRule, Published
from moeconf.registry.core import (
    ATTENTION,
    CORE_ENTRIES,
    FUSED_EXPERTS,
    GRANITE_AUX_UNRECORDED,
    SWITCH_AUX,
    TOPK_THEN_SOFTMAX,
    E,
    H,
    I,
    K,
    S,
    router_probs_recorded,
    shared_mlp,
    softmax_topk,
)
from moeconf.registry.entry import ArchEntry, Binding, Expectation, sub_config_variant
from moeconf.spec import LossSpec, MoESpec, SharedSpec

GATE = (Binding("gate.weight", ("router.weight",)),)
"""A ``TopKRouter`` named ``gate`` holding its ``[E, H]`` weight directly."""

ROUTER = (Binding("router.weight", ("router.weight",)),)
"""The same router, named ``router``."""

QWEN_SHARED = shared_mlp("shared_expert", gate="shared_expert_gate")
"""Qwen2-MoE-style sigmoid-gated shared expert."""

MIXTRAL_FIELDS: dict[str, Any] = dict(
    spec=MoESpec(E, K, H, I, router=softmax_topk(renorm="always"), losses=SWITCH_AUX),
    params=GATE + FUSED_EXPERTS,
    router_path="gate",
    experts_path="experts",
)
"""The block's own fields (spec, bindings, module names) of a Mixtral-style block whose router is named ``gate``:
R1 with renormalisation, Switch aux loss (MiniMax, Qwen3-VL-MoE, the Qwen3-Omni thinker, Mellum)."""

QWEN_NEXT_FIELDS: dict[str, Any] = dict(
    spec=MoESpec(
        E, K, H, I, router=softmax_topk(renorm="always"), shared=SharedSpec(S, gate="sigmoid"), losses=SWITCH_AUX
    ),
    params=GATE + FUSED_EXPERTS + QWEN_SHARED,
    router_path="gate",
    experts_path="experts",
)
"""``MIXTRAL_FIELDS`` plus the ``QWEN_SHARED`` expert (Qwen3-Next, Qwen3.5-MoE, Qwen4-Exp)."""

TINY_VISION_QWEN = dict(
    depth=1,
    hidden_size=16,
    intermediate_size=16,
    num_heads=2,
    patch_size=4,
    temporal_patch_size=2,
    spatial_merge_size=2,
    out_hidden_size=H,
    num_position_embeddings=16,
)
"""A one-layer Qwen-VL vision tower (only built, never run)."""

GATED_DELTANET = dict(linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4)
"""Tiny Gated DeltaNet (linear attention) heads of the Qwen3-Next-style hybrids."""

QWEN3_5_TEXT = dict(
    hidden_size=H,
    moe_intermediate_size=I,
    shared_expert_intermediate_size=S,
    num_experts=E,
    num_experts_per_tok=K,
    num_hidden_layers=1,
    head_dim=8,
    layer_types=["full_attention"],
    **GATED_DELTANET,
    router_aux_loss_coef=0.02,
    output_router_logits=True,
    **ATTENTION,
)
"""Qwen3.5-MoE text config; it has no ``norm_topk_prob`` (the router always renormalises)."""

QWEN3_VL_TEXT = dict(
    hidden_size=H,
    intermediate_size=48,
    moe_intermediate_size=I,
    num_experts=E,
    num_experts_per_tok=K,
    num_hidden_layers=1,
    decoder_sparse_step=1,
    head_dim=8,
    router_aux_loss_coef=0.02,
    output_router_logits=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1]},
    **ATTENTION,
)
"""Qwen3-VL-MoE text config; no ``norm_topk_prob`` (the router always renormalises)."""

QWEN4_TEXT = dict(
    hidden_size=H,
    moe_intermediate_size=I,
    shared_expert_intermediate_size=S,
    num_experts=E,
    num_experts_per_tok=K,
    norm_topk_prob=True,
    num_hidden_layers=1,
    head_dim=8,
    layer_types=["linear_attention"],
    **GATED_DELTANET,
    hc_count=2,
    hc_lowrank=4,
    router_aux_loss_coef=0.02,
    output_router_logits=True,
    **ATTENTION,
)
"""Qwen4-Exp text config (one GatedDeltaNet layer, minimal hyper-connections; no PLE, no QSA indexer)."""

QWEN3_OMNI_TEXT = dict(
    hidden_size=H,
    intermediate_size=48,
    moe_intermediate_size=I,
    num_experts=E,
    num_experts_per_tok=K,
    norm_topk_prob=True,
    num_hidden_layers=1,
    decoder_sparse_step=1,
    head_dim=8,
    router_aux_loss_coef=0.02,
    output_router_logits=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1]},
    **ATTENTION,
)
"""The Qwen3-Omni thinker's text config (``qwen3_omni_moe_text``)."""

QWEN3_OMNI_THINKER = dict(
    text_config=QWEN3_OMNI_TEXT,
    vision_config=dict(TINY_VISION_QWEN, deepstack_visual_indexes=[0]),
    audio_config=dict(
        num_mel_bins=8,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=16,
        d_model=16,
        output_dim=H,
        downsample_hidden_size=8,
        n_window=4,
        n_window_infer=8,
        conv_chunksize=8,
        max_source_positions=32,
    ),
)
"""The Qwen3-Omni thinker (``qwen3_omni_moe_thinker``) with one-layer vision and audio towers (built, never run)."""

ARIA_TEXT = dict(
    hidden_size=H,
    intermediate_size=I,
    moe_num_experts=E,
    moe_topk=K,
    moe_num_shared_experts=2,
    hidden_act="silu",
    mlp_bias=False,
    num_hidden_layers=1,
    head_dim=8,
    pad_token_id=0,
    **ATTENTION,
)
"""Aria text config: routed experts hard-code SiLU, the shared MLP (intermediate_size × 2) uses hidden_act."""

LLAMA4_TEXT = dict(
    hidden_size=H,
    intermediate_size=I,
    intermediate_size_mlp=48,
    num_local_experts=E,
    num_experts_per_tok=K,
    num_hidden_layers=1,
    head_dim=8,
    interleave_moe_layer_step=1,
    no_rope_layers=[1],
    router_jitter_noise=0.0,
    **ATTENTION,
)
"""Llama-4 text config (``llama4_text``; the composite ``llama4`` is registered in core.py)."""

LLAMA4 = next(entry for entry in CORE_ENTRIES if entry.model_type == "llama4")


def granite_config(**layers: Any) -> dict[str, Any]:
    """Tiny config of the GraniteMoE models with a decoder-layer shared MLP; ``layers`` (layer types, window,
    Mamba sizes) come after ``num_hidden_layers``."""
    return dict(
        hidden_size=H,
        intermediate_size=I,
        shared_intermediate_size=S,
        num_local_experts=E,
        num_experts_per_tok=K,
        num_hidden_layers=1,
        **layers,
        router_aux_loss_coef=0.02,
        output_router_logits=True,
        **ATTENTION,
    )


GRANITE_FIELDS: dict[str, Any] = dict(
    spec=MoESpec(E, K, H, I, router=TOPK_THEN_SOFTMAX, losses=SWITCH_AUX),
    params=ROUTER + FUSED_EXPERTS,
    router_path="router",
    experts_path="experts",
    expectations=GRANITE_AUX_UNRECORDED,
)
"""The GraniteMoE block (core.py's ``granitemoe``) of the variants whose shared MLP (``shared_intermediate_size``)
lives in the decoder layer, outside the block: the block's spec has no shared expert."""


QWEN3_5_MOE = ArchEntry(
    model_type="qwen3_5_moe",
    config_class="Qwen3_5MoeConfig",
    config_kwargs=dict(text_config=QWEN3_5_TEXT, vision_config=TINY_VISION_QWEN),
    block_class="Qwen3_5MoeSparseMoeBlock",
    block_path="model.language_model.layers.0.mlp",
    model_class="Qwen3_5MoeForConditionalGeneration",
    block_config_attr="text_config",
    **QWEN_NEXT_FIELDS,
    aux_coef_attr="text_config.router_aux_loss_coef",
    expectations=router_probs_recorded("5.2.0 modeling_qwen3_5_moe.py:861"),
)

QWEN3_VL_MOE = ArchEntry(
    model_type="qwen3_vl_moe",
    config_class="Qwen3VLMoeConfig",
    config_kwargs=dict(text_config=QWEN3_VL_TEXT, vision_config=dict(TINY_VISION_QWEN, deepstack_visual_indexes=[0])),
    block_class="Qwen3VLMoeTextSparseMoeBlock",
    block_path="model.language_model.layers.0.mlp",
    model_class="Qwen3VLMoeForConditionalGeneration",
    block_config_attr="text_config",
    **MIXTRAL_FIELDS,
    aux_coef_attr="text_config.router_aux_loss_coef",
    expectations=router_probs_recorded("5.0.0 modeling_qwen3_vl_moe.py:129"),
    published=(Published("Qwen/Qwen3-VL-30B-A3B-Instruct", {"num_experts": 128, "num_experts_per_tok": 8}),),
)

QWEN4_EXP = ArchEntry(
    model_type="qwen4_exp",
    config_class="Qwen4ExpConfig",
    config_kwargs=dict(text_config=QWEN4_TEXT, vision_config=TINY_VISION_QWEN),
    block_class="Qwen4ExpTextSparseMoeBlock",
    block_path="model.language_model.layers.0.mlp",
    model_class="Qwen4ExpForConditionalGeneration",
    block_config_attr="text_config",
    **QWEN_NEXT_FIELDS,
    aux_coef_attr="text_config.router_aux_loss_coef",
)

QWEN3_OMNI_MOE_THINKER = ArchEntry(
    model_type="qwen3_omni_moe_thinker",
    config_class="Qwen3OmniMoeThinkerConfig",
    config_kwargs=QWEN3_OMNI_THINKER,
    modeling_module="transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe",
    block_class="Qwen3OmniMoeThinkerTextSparseMoeBlock",
    block_path="model.language_model.layers.0.mlp",
    model_class="Qwen3OmniMoeThinkerForConditionalGeneration",
    block_config_attr="text_config",
    **MIXTRAL_FIELDS,
    aux_coef_attr="text_config.router_aux_loss_coef",
    expectations=(
        Expectation(
            "xfail",
            check="config_aux_loss",
            reason="upstream: Qwen3OmniMoeThinkerForConditionalGeneration.forward reads config.vision_start_token_id, "
            "which only the talker config (Qwen3OmniMoeTalkerConfig) defines: the loss cannot be computed from "
            "this config",
        ),
    )
    + router_probs_recorded("5.0.0 modeling_qwen3_omni_moe.py:1448, Qwen3OmniMoeThinkerTextTopKRouter"),
)

ARIA = ArchEntry(
    model_type="aria",
    config_class="AriaConfig",
    config_kwargs=dict(
        # model_type as a config.json carries it: AriaConfig before 5.20 converts a text_config dict only when
        # it has one (5.6.2 configuration_aria.py:141) and otherwise crashes setting _attn_implementation.
        text_config=dict(ARIA_TEXT, model_type="aria_text"),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ),
        projector_patch_to_query_dict={16: 4},
    ),
    block_class="AriaTextMoELayer",
    block_path="model.language_model.layers.0.mlp",
    model_class="AriaForConditionalGeneration",
    block_config_attr="text_config",
    spec=MoESpec(E, K, H, I, router=TOPK_THEN_SOFTMAX, shared=SharedSpec(2 * I)),
    params=ROUTER
    + (
        Binding("experts.gate_up_proj", ("experts.w_gate", "experts.w_up"), "gate_up_cols"),
        Binding("experts.down_proj", ("experts.w_down",), "transposed"),
    )
    + shared_mlp("shared_experts"),
    router_path="router",
    experts_path="experts",
    # AriaSharedExpertsMLP: one MLP of intermediate_size × moe_num_shared_experts
    config_fields=(FieldRule("moe_num_shared_experts", "shared_multiple"),),
    published=(Published("rhymes-ai/Aria", {"moe_num_experts": 64, "moe_topk": 6, "moe_num_shared_experts": 2}),),
)


ENTRIES: tuple[ArchEntry, ...] = (
    ArchEntry(
        model_type="minimax",
        config_class="MiniMaxConfig",
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=I,
            num_local_experts=E,
            num_experts_per_tok=K,
            num_hidden_layers=1,
            head_dim=8,
            layer_types=["full_attention"],
            router_jitter_noise=0.0,
            router_aux_loss_coef=0.02,
            output_router_logits=True,
            **ATTENTION,
        ),
        block_class="MiniMaxSparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="MiniMaxForCausalLM",
        **MIXTRAL_FIELDS,
        aux_coef_attr="router_aux_loss_coef",
        expectations=router_probs_recorded("5.0.0 modeling_minimax.py:471"),
        published=(Published("MiniMaxAI/MiniMax-Text-01", {"num_local_experts": 32, "num_experts_per_tok": 2}),),
    ),
    ArchEntry(
        model_type="qwen3_next",
        config_class="Qwen3NextConfig",
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=48,
            moe_intermediate_size=I,
            shared_expert_intermediate_size=S,
            num_experts=E,
            num_experts_per_tok=K,
            norm_topk_prob=True,
            num_hidden_layers=1,
            decoder_sparse_step=1,
            head_dim=8,
            layer_types=["full_attention"],
            **GATED_DELTANET,
            router_aux_loss_coef=0.02,
            output_router_logits=True,
            **ATTENTION,
        ),
        block_class="Qwen3NextSparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="Qwen3NextForCausalLM",
        **QWEN_NEXT_FIELDS,
        aux_coef_attr="router_aux_loss_coef",
        expectations=router_probs_recorded("5.0.0 modeling_qwen3_next.py:871"),
        published=(
            Published(
                "Qwen/Qwen3-Next-80B-A3B-Instruct",
                {"num_experts": 512, "num_experts_per_tok": 10, "norm_topk_prob": True},
            ),
        ),
    ),
    QWEN3_5_MOE,
    sub_config_variant(
        QWEN3_5_MOE,
        model_type="qwen3_5_moe_text",
        config_class="Qwen3_5MoeTextConfig",
        block_path="model.layers.0.mlp",
        model_class="Qwen3_5MoeForCausalLM",
        aux_coef_attr="router_aux_loss_coef",
    ),
    QWEN3_VL_MOE,
    # The text model has no loss: only Qwen3VLMoeForConditionalGeneration adds the aux loss.
    sub_config_variant(
        QWEN3_VL_MOE,
        model_type="qwen3_vl_moe_text",
        config_class="Qwen3VLMoeTextConfig",
        block_path="layers.0.mlp",
        model_class="Qwen3VLMoeTextModel",
        spec=replace(QWEN3_VL_MOE.spec, losses=LossSpec()),
        aux_coef_attr=None,
    ),
    QWEN4_EXP,
    sub_config_variant(
        QWEN4_EXP,
        model_type="qwen4_exp_text",
        config_class="Qwen4ExpTextConfig",
        block_path="model.layers.0.mlp",
        model_class="Qwen4ExpForCausalLM",
        aux_coef_attr="router_aux_loss_coef",
    ),
    QWEN3_OMNI_MOE_THINKER,
    # The text model has no loss: the aux loss is added by Qwen3OmniMoeThinkerForConditionalGeneration.
    sub_config_variant(
        QWEN3_OMNI_MOE_THINKER,
        model_type="qwen3_omni_moe_text",
        config_class="Qwen3OmniMoeTextConfig",
        block_path="layers.0.mlp",
        model_class="Qwen3OmniMoeThinkerTextModel",
        spec=replace(QWEN3_OMNI_MOE_THINKER.spec, losses=LossSpec()),
        aux_coef_attr=None,
        expectations=(),
    ),
    ArchEntry(
        model_type="qwen3_omni_moe_talker_text",
        config_class="Qwen3OmniMoeTalkerTextConfig",
        # shared_expert_intermediate_size is read by the block but is not a field of the config: pass it.
        # norm_topk_prob=False: the talker's default (the thinker covers the renormalised path).
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=48,
            moe_intermediate_size=I,
            shared_expert_intermediate_size=S,
            num_experts=E,
            num_experts_per_tok=K,
            norm_topk_prob=False,
            num_hidden_layers=1,
            decoder_sparse_step=1,
            head_dim=8,
            router_aux_loss_coef=0.02,
            output_router_logits=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1]},
            **ATTENTION,
        ),
        modeling_module="transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe",
        block_class="Qwen3OmniMoeTalkerTextSparseMoeBlock",
        block_path="layers.0.mlp",
        # The talker text model has no loss (Qwen3OmniMoeTalkerForConditionalGeneration adds it).
        model_class="Qwen3OmniMoeTalkerModel",
        spec=MoESpec(E, K, H, I, router=softmax_topk(renorm="never"), shared=SharedSpec(S, gate="sigmoid")),
        params=GATE + FUSED_EXPERTS + QWEN_SHARED,
        router_path="gate",
        experts_path="experts",
    ),
    ArchEntry(
        model_type="flex_olmo",
        config_class="FlexOlmoConfig",
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=I,
            num_experts=E,
            num_experts_per_tok=K,
            norm_topk_prob=False,
            num_hidden_layers=1,
            pad_token_id=0,
            eos_token_id=1,
            router_aux_loss_coef=0.02,
            output_router_logits=True,
            **ATTENTION,
        ),
        block_class="FlexOlmoSparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="FlexOlmoForCausalLM",
        spec=MoESpec(E, K, H, I, router=softmax_topk(renorm="never"), losses=SWITCH_AUX),
        params=GATE + FUSED_EXPERTS,
        router_path="gate",
        experts_path="experts",
        aux_coef_attr="router_aux_loss_coef",
        expectations=router_probs_recorded("5.0.0 modeling_flex_olmo.py:346"),
    ),
    ArchEntry(
        model_type="mellum",
        config_class="MellumConfig",
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=48,
            moe_intermediate_size=I,
            num_experts=E,
            num_experts_per_tok=K,
            norm_topk_prob=True,
            num_hidden_layers=1,
            head_dim=8,
            layer_types=["full_attention"],
            mlp_layer_types=["sparse"],
            router_aux_loss_coef=0.02,
            output_router_logits=True,
            **ATTENTION,
        ),
        block_class="MellumSparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="MellumForCausalLM",
        **MIXTRAL_FIELDS,
        aux_coef_attr="router_aux_loss_coef",
    ),
    ArchEntry(
        model_type="lara_mini",
        config_class="LaraMiniConfig",
        # Router logits in fp32; the ungated shared expert is always added.
        config_kwargs=dict(
            hidden_size=H,
            moe_intermediate_size=I,
            shared_expert_intermediate_size=S,
            num_experts=E,
            num_experts_per_tok=K,
            norm_topk_prob=True,
            num_hidden_layers=1,
            head_dim=8,
            layer_types=["full_attention"],
            **GATED_DELTANET,
            router_aux_loss_coef=0.02,
            output_router_logits=True,
            **ATTENTION,
        ),
        block_class="LaraMiniSparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="LaraMiniForCausalLM",
        spec=MoESpec(E, K, H, I, router=softmax_topk(renorm="always"), shared=SharedSpec(S), losses=SWITCH_AUX),
        params=GATE + FUSED_EXPERTS + shared_mlp("shared_expert"),
        router_path="gate",
        experts_path="experts",
        aux_coef_attr="router_aux_loss_coef",
    ),
    ArchEntry(
        model_type="hunyuan_v1_moe",
        config_class="HunYuanMoEV1Config",
        # The shared MLP and the experts both use intermediate_size: the shared width is I, not S.
        # The router's wg is created in fp32 (upcasting the input); no aux loss is computed.
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=I,
            num_experts=E,
            moe_topk=K,
            num_hidden_layers=1,
            head_dim=8,
            **ATTENTION,
        ),
        block_class="HunYuanMoEV1Moe",
        block_path="model.layers.0.mlp",
        model_class="HunYuanMoEV1ForCausalLM",
        spec=MoESpec(E, K, H, I, router=softmax_topk(renorm="always"), shared=SharedSpec(I)),
        params=(Binding("gate.wg.weight", ("router.weight",)),) + FUSED_EXPERTS + shared_mlp("shared_mlp"),
        router_path="gate",
        experts_path="experts",
        block_init="config_and_layer_idx",
        expectations=tuple(
            Expectation(
                "xfail",
                "upstream, 5.0.0: HunYuanMoEV1Moe.route_tokens_to_experts scatters the top-k weights into a "
                "dense [N, E] tensor (5.0.0 modeling_hunyuan_v1_moe.py:304-306) and HunYuanMoEV1Experts reads it "
                "by top-k position, top_k_weights[token_idx, top_k_pos] (:283): each pick is weighted by "
                "expert 0's or 1's weight; fixed in 5.1.0 (weights [N, k])",
                check=check,
                releases=">=5.0,<5.1",
                case=case,
                dtype=dtype,
                backend="hf-eager",  # transformers' grouped_mm / batched_mm experts read the weights by expert
            )
            for check in ("output", "grad_input", "grad_router", "grad_experts")
            # NOTE: with one token the bf16 router gradient stays within tolerance (measured on 5.0.0).
            for case, dtype in (
                (("random", None), ("empty_expert", None), ("one_expert", None), ("single_token", "fp32"))
                if check == "grad_router"
                else ((None, None),)
            )
        ),
    ),
    ArchEntry(
        model_type="granitemoe_swa",
        config_class="GraniteMoeSWAConfig",
        config_kwargs=granite_config(layer_types=["full_attention"], sliding_window=16),
        block_class="GraniteMoeSWAMoE",
        block_path="model.layers.0.block_sparse_moe",
        model_class="GraniteMoeSWAForCausalLM",
        **GRANITE_FIELDS,
        aux_coef_attr="router_aux_loss_coef",
    ),
    ArchEntry(
        model_type="granitemoeshared",
        config_class="GraniteMoeSharedConfig",
        config_kwargs=granite_config(),
        block_class="GraniteMoeSharedMoE",
        block_path="model.layers.0.block_sparse_moe",
        model_class="GraniteMoeSharedForCausalLM",
        **GRANITE_FIELDS,
        aux_coef_attr="router_aux_loss_coef",
    ),
    ArchEntry(
        model_type="granitemoehybrid",
        config_class="GraniteMoeHybridConfig",
        # The shared MLP is always present here.
        config_kwargs=granite_config(
            layer_types=["full_attention"],
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_d_state=8,
            mamba_chunk_size=8,
        ),
        block_class="GraniteMoeHybridMoE",
        block_path="model.layers.0.block_sparse_moe",
        model_class="GraniteMoeHybridForCausalLM",
        **GRANITE_FIELDS,
        aux_coef_attr="router_aux_loss_coef",
    ),
    ARIA,
    sub_config_variant(
        ARIA,
        model_type="aria_text",
        config_class="AriaTextConfig",
        block_path="model.layers.0.mlp",
        model_class="AriaTextForCausalLM",
    ),
    ArchEntry(
        model_type="cohere2_moe",
        config_class="Cohere2MoeConfig",
        # expert_selection_fn="softmax" (top-k on logits, softmax over the k); two shared experts fused into one
        # MLP of width intermediate_size × 2, averaged with the routed output ("average"). No aux loss.
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=I,
            num_experts=E,
            num_experts_per_tok=K,
            num_shared_experts=2,
            shared_expert_combination_strategy="average",
            expert_selection_fn="softmax",
            norm_topk_prob=True,
            num_hidden_layers=1,
            head_dim=8,
            layer_types=["full_attention"],
            mlp_layer_types=["sparse"],
            **ATTENTION,
        ),
        block_class="Cohere2MoeSparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="Cohere2MoeForCausalLM",
        spec=MoESpec(E, K, H, I, router=TOPK_THEN_SOFTMAX, shared=SharedSpec(2 * I, combine="average")),
        config_fields=(
            FieldRule("expert_selection_fn", "selected_logits_fn"),
            FieldRule("num_shared_experts", "shared_multiple"),
            FieldRule("shared_expert_combination_strategy", "shared_combine"),
        ),
        params=GATE + FUSED_EXPERTS + shared_mlp("shared_experts"),
        router_path="gate",
        experts_path="experts",
    ),
    # core.py's llama4 block under the text model type, with its own text config (it also sets
    # router_jitter_noise=0.0). No aux loss (the config's router_aux_loss_coef is unused).
    replace(
        LLAMA4,
        model_type="llama4_text",
        config_class="Llama4TextConfig",
        config_kwargs=LLAMA4_TEXT,
        block_path="model.layers.0.feed_forward",
        model_class="Llama4ForCausalLM",
        block_config_attr=None,
    ),
)
