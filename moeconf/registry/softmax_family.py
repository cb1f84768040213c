"""Registry entries: softmax family (data, not code; see core.py for the shared tiny sizes and helpers)."""

from __future__ import annotations

from moeconf.registry.core import ATTENTION, E, FUSED_EXPERTS, H, I, K, S, SWITCH_AUX, shared_mlp, softmax_topk
from moeconf.registry.entry import ArchEntry, Binding
from moeconf.spec import MoESpec, SharedSpec

GATE = (Binding("gate.weight", ("router.weight",)),)
"""A ``TopKRouter`` named ``gate`` holding its ``[E, H]`` weight directly."""

QWEN_SHARED = shared_mlp("shared_expert", gate="shared_expert_gate")
"""Qwen2-MoE-style sigmoid-gated shared expert."""

TINY_VISION_QWEN = dict(
    depth=1, hidden_size=16, intermediate_size=16, num_heads=2, patch_size=4, temporal_patch_size=2,
    spatial_merge_size=2, out_hidden_size=H, num_position_embeddings=16,
)
"""A one-layer Qwen-VL vision tower (only built, never run)."""

QWEN3_5_TEXT = dict(
    hidden_size=H, moe_intermediate_size=I, shared_expert_intermediate_size=S, num_experts=E, num_experts_per_tok=K,
    num_hidden_layers=1, head_dim=8, layer_types=["full_attention"], linear_key_head_dim=8, linear_value_head_dim=8,
    linear_num_key_heads=2, linear_num_value_heads=4, router_aux_loss_coef=0.02, output_router_logits=True,
    **ATTENTION,
)
"""Qwen3.5-MoE text config; it has no ``norm_topk_prob`` (the router always renormalises)."""

QWEN3_VL_TEXT = dict(
    hidden_size=H, intermediate_size=48, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
    num_hidden_layers=1, decoder_sparse_step=1, head_dim=8, router_aux_loss_coef=0.02, output_router_logits=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1]},
    **ATTENTION,
)
"""Qwen3-VL-MoE text config; no ``norm_topk_prob`` (the router always renormalises)."""

QWEN4_TEXT = dict(
    hidden_size=H, moe_intermediate_size=I, shared_expert_intermediate_size=S, num_experts=E, num_experts_per_tok=K,
    norm_topk_prob=True, num_hidden_layers=1, head_dim=8, layer_types=["linear_attention"], linear_key_head_dim=8,
    linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, hc_count=2, hc_lowrank=4,
    router_aux_loss_coef=0.02, output_router_logits=True, **ATTENTION,
)


ENTRIES: tuple[ArchEntry, ...] = (
    ArchEntry(
        model_type="minimax",
        config_class="MiniMaxConfig",
        config_kwargs=dict(
            hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K, num_hidden_layers=1,
            head_dim=8, layer_types=["full_attention"], router_jitter_noise=0.0, router_aux_loss_coef=0.02,
            output_router_logits=True, **ATTENTION,
        ),
        modeling_module="transformers.models.minimax.modeling_minimax",
        block_class="MiniMaxSparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="MiniMaxForCausalLM",
        spec=MoESpec(E, K, H, I, router=softmax_topk("always"), losses=SWITCH_AUX),
        params=GATE + FUSED_EXPERTS,
        router_path="gate",
        experts_path="experts",
        aux_coef_attr="router_aux_loss_coef",
    ),
    ArchEntry(
        model_type="qwen3_next",
        config_class="Qwen3NextConfig",
        config_kwargs=dict(
            hidden_size=H, intermediate_size=48, moe_intermediate_size=I, shared_expert_intermediate_size=S,
            num_experts=E, num_experts_per_tok=K, norm_topk_prob=True, num_hidden_layers=1, decoder_sparse_step=1,
            head_dim=8, layer_types=["full_attention"], linear_key_head_dim=8, linear_value_head_dim=8,
            linear_num_key_heads=2, linear_num_value_heads=4, router_aux_loss_coef=0.02, output_router_logits=True,
            **ATTENTION,
        ),
        modeling_module="transformers.models.qwen3_next.modeling_qwen3_next",
        block_class="Qwen3NextSparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="Qwen3NextForCausalLM",
        spec=MoESpec(E, K, H, I, router=softmax_topk("always"), shared=SharedSpec(S, gate="sigmoid"), losses=SWITCH_AUX),
        params=GATE + FUSED_EXPERTS + QWEN_SHARED,
        router_path="gate",
        experts_path="experts",
        aux_coef_attr="router_aux_loss_coef",
    ),
    ArchEntry(
        model_type="qwen3_5_moe",
        config_class="Qwen3_5MoeConfig",
        config_kwargs=dict(text_config=QWEN3_5_TEXT, vision_config=TINY_VISION_QWEN),
        modeling_module="transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
        block_class="Qwen3_5MoeSparseMoeBlock",
        block_path="model.language_model.layers.0.mlp",
        model_class="Qwen3_5MoeForConditionalGeneration",
        block_config_attr="text_config",
        spec=MoESpec(E, K, H, I, router=softmax_topk("always"), shared=SharedSpec(S, gate="sigmoid"), losses=SWITCH_AUX),
        params=GATE + FUSED_EXPERTS + QWEN_SHARED,
        router_path="gate",
        experts_path="experts",
        aux_coef_attr="text_config.router_aux_loss_coef",
    ),
    ArchEntry(
        model_type="qwen3_5_moe_text",
        config_class="Qwen3_5MoeTextConfig",
        config_kwargs=QWEN3_5_TEXT,
        modeling_module="transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
        block_class="Qwen3_5MoeSparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="Qwen3_5MoeForCausalLM",
        spec=MoESpec(E, K, H, I, router=softmax_topk("always"), shared=SharedSpec(S, gate="sigmoid"), losses=SWITCH_AUX),
        params=GATE + FUSED_EXPERTS + QWEN_SHARED,
        router_path="gate",
        experts_path="experts",
        aux_coef_attr="router_aux_loss_coef",
    ),
    ArchEntry(
        model_type="qwen3_vl_moe",
        config_class="Qwen3VLMoeConfig",
        config_kwargs=dict(text_config=QWEN3_VL_TEXT, vision_config=dict(TINY_VISION_QWEN, deepstack_visual_indexes=[0])),
        modeling_module="transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe",
        block_class="Qwen3VLMoeTextSparseMoeBlock",
        block_path="model.language_model.layers.0.mlp",
        model_class="Qwen3VLMoeForConditionalGeneration",
        block_config_attr="text_config",
        spec=MoESpec(E, K, H, I, router=softmax_topk("always"), losses=SWITCH_AUX),
        params=GATE + FUSED_EXPERTS,
        router_path="gate",
        experts_path="experts",
        aux_coef_attr="text_config.router_aux_loss_coef",
    ),
    ArchEntry(
        model_type="qwen3_vl_moe_text",
        config_class="Qwen3VLMoeTextConfig",
        config_kwargs=QWEN3_VL_TEXT,
        modeling_module="transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe",
        block_class="Qwen3VLMoeTextSparseMoeBlock",
        block_path="layers.0.mlp",
        # The text model has no loss: only Qwen3VLMoeForConditionalGeneration adds the aux loss.
        model_class="Qwen3VLMoeTextModel",
        spec=MoESpec(E, K, H, I, router=softmax_topk("always")),
        params=GATE + FUSED_EXPERTS,
        router_path="gate",
        experts_path="experts",
    ),
    ArchEntry(
        model_type="qwen4_exp",
        config_class="Qwen4ExpConfig",
        config_kwargs=dict(text_config=QWEN4_TEXT, vision_config=TINY_VISION_QWEN),
        modeling_module="transformers.models.qwen4_exp.modeling_qwen4_exp",
        block_class="Qwen4ExpTextSparseMoeBlock",
        block_path="model.language_model.layers.0.mlp",
        model_class="Qwen4ExpForConditionalGeneration",
        block_config_attr="text_config",
        spec=MoESpec(E, K, H, I, router=softmax_topk("always"), shared=SharedSpec(S, gate="sigmoid"), losses=SWITCH_AUX),
        params=GATE + FUSED_EXPERTS + QWEN_SHARED,
        router_path="gate",
        experts_path="experts",
        aux_coef_attr="text_config.router_aux_loss_coef",
    ),
    ArchEntry(
        model_type="qwen4_exp_text",
        config_class="Qwen4ExpTextConfig",
        config_kwargs=QWEN4_TEXT,
        modeling_module="transformers.models.qwen4_exp.modeling_qwen4_exp",
        block_class="Qwen4ExpTextSparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="Qwen4ExpForCausalLM",
        spec=MoESpec(E, K, H, I, router=softmax_topk("always"), shared=SharedSpec(S, gate="sigmoid"), losses=SWITCH_AUX),
        params=GATE + FUSED_EXPERTS + QWEN_SHARED,
        router_path="gate",
        experts_path="experts",
        aux_coef_attr="router_aux_loss_coef",
    ),
)
