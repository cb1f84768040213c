"""Registry entries: sigmoid family (data, not code; see core.py for the shared tiny sizes and helpers).

Sigmoid (or sqrt-softplus) routers without expert groups, plus the softmax-with-selection-bias
routers of the same generation (ERNIE, LongCat). See docs/router-families.md, 'Families'.

MiniMax-M3 and Inkling2 are in extra_family.py; the types moeconf cannot express yet are declared,
with reasons, in ``moeconf.tools.coverage.DECLARED_UNSUPPORTED``.
"""

from __future__ import annotations

from typing import Any

from moeconf.registry.config_space import FieldRule, Published
from moeconf.registry.core import ATTENTION, FUSED_EXPERTS, SWITCH_AUX, WEIGHTING_CHECKS, E, H, I, K, S, shared_mlp
from moeconf.registry.entry import ArchEntry, Binding, Expectation, sub_config_variant
from moeconf.spec import ExpertSpec, MoESpec, RouterSpec, SharedSpec


def sigmoid_router(**options: object) -> RouterSpec:
    """R4: sigmoid scores → top-k of (scores + selection bias) → gathered unbiased scores → renormalise.

    ``options`` override any of these (DeepSeek-V4: ``scoring="sqrtsoftplus"``) or set the other fields."""
    base: dict[str, object] = {
        "scoring": "sigmoid",
        "select_on": "scores",
        "selection_bias": True,
        "weight_from": "scores",
        "renorm": "always",
    }
    return RouterSpec(**{**base, **options})  # type: ignore[arg-type]


GATE = (Binding("gate.weight", ("router.weight",)),)
GATE_BIAS = (Binding("gate.e_score_correction_bias", ("router.selection_bias",)),)
BLOCK_BIAS = (Binding("e_score_correction_bias", ("router.selection_bias",)),)
"""MiniMax-M2 / HY-V3 keep the selection bias on the block and pass it to the router."""
EXPERT_BIAS = (Binding("expert_bias", ("router.selection_bias",)),)
"""AFMoE / LFM2-MoE: the selection bias is the block's ``expert_bias``."""

BIASED_BLOCK = GATE + GATE_BIAS + FUSED_EXPERTS + shared_mlp("shared_experts")
"""DeepSeek-V3-style block: ``gate`` with its selection bias, fused experts, gate/up/down ``shared_experts``."""

BIASED_FIELDS: dict[str, Any] = dict(params=BIASED_BLOCK, router_path="gate", experts_path="experts")
"""The bindings and module names of a ``BIASED_BLOCK`` (router ``gate``, experts ``experts``)."""

SWIGLU_LIMIT = 3.0
"""Clamp limit of the clamped experts: a few of the tiny O(1) activations exceed it (so fp32 checks the
clamp), yet few enough lie within bf16 rounding of it. NOTE: at limits inside the bulk (1.0-2.0) bf16
gradients fail: the cases keep a margin from routing ties but not from the clamp (a pre-activation of
1.2512 rounds to exactly 1.25 in bf16 and flips the clamp's gradient)."""

STEP3P7_TEXT = dict(
    hidden_size=H,
    intermediate_size=48,
    moe_intermediate_size=I,
    share_expert_dim=S,
    n_routed_experts=E,
    num_experts_per_tok=K,
    num_hidden_layers=1,
    head_dim=8,
    sliding_window=16,
    mlp_layer_types=["sparse"],
    swiglu_limits=[SWIGLU_LIMIT],
    swiglu_limits_shared=None,
    moe_router_scaling_factor=2.0,
    **ATTENTION,
)
"""Step-3.7 text config: routed experts clamped after the activation (``swiglu_limits[layer]``), shared
expert unclamped (no ``swiglu_limits_shared``), routed output × ``moe_router_scaling_factor``."""

DSV4_SWIGLU_LIMIT = 10.0
"""DeepSeek-V4's default. NOTE: DeepseekV4MLP (the shared expert) clamps at swiglu_limit too, which the
config documents as clipping the *routed* experts only and SharedSpec cannot express; 10 is never
reached by the tiny activations, so both readings agree here (a low limit makes output, grad_input
and grad_shared_experts differ, see the session report)."""

DSV4_NORM_IGNORED = (
    "upstream: DeepseekV4TopKRouter never reads the documented config.norm_topk_prob: it always renormalises "
    "the top-k weights (modeling_deepseek_v4.py:1094 in transformers 5.24), so norm_topk_prob=False changes nothing"
)

STEP3P7 = ArchEntry(
    model_type="step3p7",
    config_class="Step3p7Config",
    config_kwargs=dict(
        text_config=STEP3P7_TEXT,
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=14),
    ),
    block_class="Step3p7SparseMoeBlock",
    block_path="model.language_model.layers.0.mlp",
    model_class="Step3p7ForConditionalGeneration",
    block_config_attr="text_config",
    spec=MoESpec(
        E,
        K,
        H,
        I,
        router=sigmoid_router(routed_scaling=2.0, scaling_site="output"),
        experts=ExpertSpec(glu="clamped_after_act", gptoss_limit=SWIGLU_LIMIT),
        shared=SharedSpec(S),
    ),
    config_fields=(
        FieldRule("moe_router_scaling_factor", "routed_scaling"),
        FieldRule("share_expert_dim", "shared_intermediate"),
    ),
    **BIASED_FIELDS,
    block_init="config_and_layer_idx",
    experts_implementations=("eager",),
)


ENTRIES: tuple[ArchEntry, ...] = (
    ArchEntry(
        model_type="minimax_m2",
        config_class="MiniMaxM2Config",
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=I,
            num_local_experts=E,
            num_experts_per_tok=K,
            num_hidden_layers=1,
            head_dim=8,
            router_jitter_noise=0.0,
            router_aux_loss_coef=0.02,
            output_router_logits=True,
            **ATTENTION,
        ),
        block_class="MiniMaxM2SparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="MiniMaxM2ForCausalLM",
        # Renormalised without eps, no scaling; the aux loss applies softmax to the sigmoid router's logits.
        spec=MoESpec(E, K, H, I, router=sigmoid_router(), losses=SWITCH_AUX),
        params=GATE + BLOCK_BIAS + FUSED_EXPERTS,
        router_path="gate",
        experts_path="experts",
        aux_coef_attr="router_aux_loss_coef",
        published=(Published("MiniMaxAI/MiniMax-M2", {"num_local_experts": 256, "num_experts_per_tok": 8}),),
    ),
    STEP3P7,
    sub_config_variant(
        STEP3P7,
        model_type="step3p5",
        config_class="Step3p7TextConfig",
        block_path="layers.0.mlp",
        model_class="Step3p7TextModel",
    ),
    ArchEntry(
        model_type="hy_v3",
        config_class="HYV3Config",
        # Shared width = moe_intermediate_size × num_shared_experts (not separately configurable).
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=48,
            moe_intermediate_size=I,
            num_experts=E,
            num_experts_per_tok=K,
            num_shared_experts=1,
            router_scaling_factor=2.5,
            enable_moe_fp32_combine=True,
            mlp_bias=False,
            mlp_layer_types=["sparse"],
            num_hidden_layers=1,
            head_dim=8,
            **ATTENTION,
        ),
        block_class="HYV3MoE",
        block_path="model.layers.0.mlp",
        model_class="HYV3ForCausalLM",
        spec=MoESpec(E, K, H, I, router=sigmoid_router(renorm_eps=1e-20, routed_scaling=2.5), shared=SharedSpec(I)),
        config_fields=(
            FieldRule("router_scaling_factor", "routed_scaling"),
            FieldRule("num_shared_experts", "shared_multiple"),
        ),
        params=GATE + BLOCK_BIAS + FUSED_EXPERTS + shared_mlp("shared_experts"),
        router_path="gate",
        experts_path="experts",
    ),
    ArchEntry(
        model_type="laguna",
        config_class="LagunaConfig",
        # Soft-capped logits (3·tanh(ℓ/3)); routed output × moe_routed_scaling_factor, then + shared.
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=48,
            moe_intermediate_size=I,
            shared_expert_intermediate_size=S,
            num_experts=E,
            num_experts_per_tok=K,
            moe_routed_scaling_factor=2.0,
            moe_router_logit_softcapping=3.0,
            moe_apply_router_weight_on_input=False,
            mlp_layer_types=["sparse"],
            layer_types=["full_attention"],
            num_hidden_layers=1,
            head_dim=8,
            sliding_window=16,
            router_aux_loss_coef=0.02,
            output_router_logits=True,
            **ATTENTION,
        ),
        block_class="LagunaSparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="LagunaForCausalLM",
        spec=MoESpec(
            E,
            K,
            H,
            I,
            router=sigmoid_router(logit_softcap=3.0, routed_scaling=2.0, scaling_site="output"),
            shared=SharedSpec(S),
            losses=SWITCH_AUX,
        ),
        config_fields=(
            FieldRule("moe_routed_scaling_factor", "routed_scaling"),
            FieldRule("moe_router_logit_softcapping", "logit_softcap_or_zero"),
        ),
        **BIASED_FIELDS,
        aux_coef_attr="router_aux_loss_coef",
    ),
    ArchEntry(
        model_type="afmoe",
        config_class="AfmoeConfig",
        # Selection bias = the block's frozen ``expert_bias`` Parameter; weights × route_scale.
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=48,
            moe_intermediate_size=I,
            num_experts=E,
            num_experts_per_tok=K,
            num_shared_experts=1,
            num_dense_layers=0,
            route_scale=2.0,
            mup_enabled=False,
            num_hidden_layers=1,
            head_dim=8,
            sliding_window=16,
            global_attn_every_n_layers=1,
            **ATTENTION,
        ),
        block_class="AfmoeSparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="AfmoeForCausalLM",
        spec=MoESpec(E, K, H, I, router=sigmoid_router(renorm_eps=1e-20, routed_scaling=2.0), shared=SharedSpec(I)),
        config_fields=(FieldRule("route_scale", "routed_scaling"), FieldRule("num_shared_experts", "shared_multiple")),
        params=(Binding("router.gate.weight", ("router.weight",)),)
        + EXPERT_BIAS
        + FUSED_EXPERTS
        + shared_mlp("shared_experts"),
        router_path="router",
        experts_path="experts",
        expectations=tuple(
            Expectation(
                "xfail",
                "upstream, before 5.4: AfmoeExperts is an nn.ModuleList whose forward calls only the experts "
                "that received tokens (5.0.0 modeling_afmoe.py:218-227), so an unrouted expert's weights get "
                ".grad None, not zeros (ZeRO-2/FSDP hang, DeepSpeed #5066); 5.4.0 fused the experts",
                check="grad_experts",
                backend="hf-eager",
                releases=">=5.0,<5.4",
                case=case,
            )
            for case in ("single_token", "empty_expert", "one_expert")  # the cases with an idle expert
        ),
    ),
    ArchEntry(
        model_type="lfm2_moe",
        config_class="Lfm2MoeConfig",
        # Layer 0 is dense (num_dense_layers=1), layer 1 is the MoE layer.
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=48,
            moe_intermediate_size=I,
            num_experts=E,
            num_experts_per_tok=K,
            num_dense_layers=1,
            use_expert_bias=True,
            norm_topk_prob=True,
            routed_scaling_factor=1.5,
            num_hidden_layers=2,
            layer_types=["full_attention", "conv"],
            **ATTENTION,
        ),
        block_class="Lfm2MoeSparseMoeBlock",
        block_path="model.layers.1.feed_forward",
        model_class="Lfm2MoeForCausalLM",
        spec=MoESpec(E, K, H, I, router=sigmoid_router(renorm_eps=1e-6, routed_scaling=1.5)),
        params=GATE + EXPERT_BIAS + FUSED_EXPERTS,
        router_path="gate",
        experts_path="experts",
        published=(
            Published("LiquidAI/LFM2-8B-A1B", {"num_experts": 32, "num_experts_per_tok": 4, "norm_topk_prob": True}),
        ),
    ),
    ArchEntry(
        model_type="deepseek_v4",
        config_class="DeepseekV4Config",
        # One non-hash ("moe") layer: hash layers route by tid2eid[input_ids] and need input_ids.
        # n_shared_experts / norm_topk_prob / router_jitter_noise are set to the values the code hard-wires.
        config_kwargs=dict(
            hidden_size=H,
            moe_intermediate_size=I,
            n_routed_experts=E,
            num_experts_per_tok=K,
            n_shared_experts=1,
            scoring_func="sqrtsoftplus",
            norm_topk_prob=True,
            routed_scaling_factor=1.5,
            swiglu_limit=DSV4_SWIGLU_LIMIT,
            router_jitter_noise=0.0,
            mlp_layer_types=["moe"],
            layer_types=["sliding_attention"],
            num_hidden_layers=1,
            head_dim=16,
            q_lora_rank=16,
            o_groups=2,
            o_lora_rank=16,
            index_n_heads=2,
            index_head_dim=8,
            index_topk=4,
            sliding_window=8,
            hc_mult=2,
            num_nextn_predict_layers=0,
            router_aux_loss_coef=0.02,
            output_router_logits=True,
            num_attention_heads=4,
            num_key_value_heads=1,
            vocab_size=128,
            max_position_embeddings=64,
        ),
        block_class="DeepseekV4SparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="DeepseekV4ForCausalLM",
        spec=MoESpec(
            E,
            K,
            H,
            I,
            router=sigmoid_router(scoring="sqrtsoftplus", renorm_eps=1e-20, routed_scaling=1.5),
            experts=ExpertSpec(glu="clamped_swiglu", gptoss_limit=DSV4_SWIGLU_LIMIT),
            # DeepseekV4MLP (the shared expert) clamps at swiglu_limit too (modeling_deepseek_v4.py:1027-1033)
            shared=SharedSpec(I, mlp=ExpertSpec(glu="clamped_swiglu", gptoss_limit=DSV4_SWIGLU_LIMIT)),
            losses=SWITCH_AUX,
        ),
        config_fields=(
            FieldRule("scoring_func", "scoring"),
            FieldRule("swiglu_limit", "swiglu_limit"),
            FieldRule("swiglu_limit", "shared_swiglu_limit"),
        ),
        **BIASED_FIELDS,
        block_init="config_and_layer_idx",
        aux_coef_attr="router_aux_loss_coef",
        expectations=tuple(
            Expectation("xfail", DSV4_NORM_IGNORED, check=check, when=(("norm_topk_prob", False),))
            for check in WEIGHTING_CHECKS
        )
        + tuple(
            # the block's shared MLP has the width of one expert whatever n_shared_experts says, so no binding
            # can hold the spec's n × wider one (an EntryError, which no xfail may excuse)
            Expectation(
                "skip",
                "upstream: DeepseekV4SparseMoeBlock never reads config.n_shared_experts: its shared expert is "
                "DeepseekV4MLP(config) of width config.intermediate_size (modeling_deepseek_v4.py:1023, :1135 in "
                "transformers 5.24), one shared expert whatever the config says",
                when=(("n_shared_experts", n),),
            )
            for n in (2, 3)
        ),
    ),
    ArchEntry(
        model_type="flint",
        config_class="FlintConfig",
        # No selection bias: top-k of sigmoid(ℓ) directly, fp32 router.
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=48,
            moe_intermediate_size=I,
            shared_expert_intermediate_size=S,
            num_experts=E,
            num_experts_per_tok=K,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            num_hidden_layers=1,
            head_dim=8,
            sliding_window=16,
            router_aux_loss_coef=0.02,
            output_router_logits=True,
            **ATTENTION,
        ),
        block_class="FlintSparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="FlintForCausalLM",
        spec=MoESpec(E, K, H, I, router=sigmoid_router(selection_bias=False), shared=SharedSpec(S), losses=SWITCH_AUX),
        params=GATE + FUSED_EXPERTS + shared_mlp("shared_expert"),
        router_path="gate",
        experts_path="experts",
        aux_coef_attr="router_aux_loss_coef",
    ),
    ArchEntry(
        model_type="kolibri1",
        config_class="Kolibri1Config",
        # Selection on logits + bias; weights = sigmoid of the selected logits, renormalised.
        config_kwargs=dict(
            hidden_size=H,
            moe_intermediate_size=I,
            shared_expert_intermediate_size=S,
            num_local_experts=E,
            num_experts_per_tok=K,
            norm_topk_prob=True,
            num_hidden_layers=1,
            head_dim=8,
            sliding_window=16,
            **ATTENTION,
        ),
        block_class="Kolibri1SparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="Kolibri1ForCausalLM",
        spec=MoESpec(
            E,
            K,
            H,
            I,
            router=sigmoid_router(select_on="logits", weight_from="sigmoid_of_selected_logits"),
            shared=SharedSpec(S),
        ),
        **BIASED_FIELDS,
    ),
    ArchEntry(
        model_type="ernie4_5_moe",
        config_class="Ernie4_5_MoeConfig",
        # Softmax + selection bias, weights p[i] / max(Σ, moe_norm_min); shared width = moe_I × n_shared.
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=48,
            moe_intermediate_size=I,
            moe_num_experts=E,
            moe_k=K,
            moe_num_shared_experts=1,
            moe_layer_start_index=0,
            moe_layer_end_index=-1,
            moe_layer_interval=1,
            moe_norm_min=1e-12,
            use_bias=False,
            num_hidden_layers=1,
            router_aux_loss_coef=0.02,
            output_router_logits=True,
            **ATTENTION,
        ),
        block_class="Ernie4_5_MoeSparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="Ernie4_5_MoeForCausalLM",
        spec=MoESpec(
            E,
            K,
            H,
            I,
            router=RouterSpec(
                scoring="softmax", selection_bias=True, renorm="always", renorm_eps=1e-12, renorm_clamp=True
            ),
            shared=SharedSpec(I),
            losses=SWITCH_AUX,
        ),
        config_fields=(
            FieldRule("moe_num_shared_experts", "shared_multiple"),
            FieldRule("moe_norm_min", "renorm_eps"),
        ),
        params=GATE
        + (
            # moe_statics keeps the bias as a frozen [1, E] Parameter: "flat_experts" is the [E] ↔ [1, E] reshape.
            Binding("gate.moe_statics.e_score_correction_bias", ("router.selection_bias",), "flat_experts"),
        )
        + FUSED_EXPERTS
        + shared_mlp("shared_experts"),
        router_path="gate",
        experts_path="experts",
        aux_coef_attr="router_aux_loss_coef",
        published=(
            Published("baidu/ERNIE-4.5-21B-A3B-PT", {"moe_num_experts": 64, "moe_k": 6, "moe_num_shared_experts": 2}),
        ),
    ),
    ArchEntry(
        model_type="longcat_flash",
        config_class="LongcatFlashConfig",
        # zero_expert_num=0: with Z > 0 gate_up_proj has E+Z rows, Z of them dead, that no layout can bind.
        config_kwargs=dict(
            hidden_size=H,
            ffn_hidden_size=48,
            expert_ffn_hidden_size=I,
            n_routed_experts=E,
            moe_topk=K,
            zero_expert_num=0,
            routed_scaling_factor=2.0,
            num_layers=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            head_dim=8,
            v_head_dim=8,
            **ATTENTION,
        ),
        block_class="LongcatFlashMoE",
        block_path="model.layers.0.mlp",
        model_class="LongcatFlashForCausalLM",
        # Softmax + selection bias, no renormalisation, weights × routed_scaling_factor.
        spec=MoESpec(E, K, H, I, router=RouterSpec(scoring="softmax", selection_bias=True, routed_scaling=2.0)),
        params=(
            Binding("router.classifier.weight", ("router.weight",)),
            Binding("router.e_score_correction_bias", ("router.selection_bias",)),
        )
        + FUSED_EXPERTS,
        router_path="router",
        experts_path="experts",
        experts_implementations=("eager",),
        published=(
            Published(
                "meituan-longcat/LongCat-Flash-Chat",
                {"n_routed_experts": 512, "moe_topk": 12},
            ),
        ),
        expectations=(
            Expectation(
                "skip",
                "upstream: LongcatFlashExperts.forward raises for moe_topk=1: torch.where(expert_mask[e].squeeze(0)) "
                "squeezes the top-k axis away and returns one index tensor, not two (modeling_longcat_flash.py:190 "
                "in transformers 5.24: ValueError: not enough values to unpack)",
                when=(("moe_topk", 1),),
            ),
        ),
    ),
)
