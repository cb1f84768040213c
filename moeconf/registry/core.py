"""Registry entries for the core architectures (one per HF ``model_type``; data, not code).

Tiny sizes are shared so that H ≠ I ≠ 2I: a transposed or swapped weight can never pass by shape.
"""

from __future__ import annotations

from moeconf.registry.config_space import FieldRule, Published
from moeconf.registry.entry import ArchEntry, Binding, Expectation
from moeconf.spec import ExpertSpec, GroupLimit, LossSpec, MoESpec, RouterSpec, SharedSpec

E, K, H, I, S = 8, 2, 32, 24, 16
"""Tiny sizes: experts, top-k, hidden, expert intermediate, shared intermediate."""

ATTENTION = {"num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 128, "max_position_embeddings": 64}
SWITCH_AUX = LossSpec(aux="switch")

FUSED_EXPERTS = (
    Binding("experts.gate_up_proj", ("experts.w_gate", "experts.w_up"), "gate_up_rows"),
    Binding("experts.down_proj", ("experts.w_down",)),
)


def shared_mlp(prefix: str, *, gate: str | None = None) -> tuple[Binding, ...]:
    """Bindings of a gate/up/down ``nn.Linear`` shared expert under ``prefix`` (plus its sigmoid gate)."""
    bindings = (
        Binding(f"{prefix}.gate_proj.weight", ("shared.w_gate",)),
        Binding(f"{prefix}.up_proj.weight", ("shared.w_up",)),
        Binding(f"{prefix}.down_proj.weight", ("shared.w_down",)),
    )
    return bindings + ((Binding(f"{gate}.weight", ("shared.gate",)),) if gate else ())


def softmax_topk(*, renorm: str) -> RouterSpec:
    """R1: softmax over all experts → top-k → renormalise (``always`` / ``never``)."""
    return RouterSpec(scoring="softmax", select_on="scores", weight_from="scores", renorm=renorm)  # type: ignore[arg-type]


TOPK_THEN_SOFTMAX = RouterSpec(scoring="softmax", select_on="logits", weight_from="softmax_of_selected_logits")
"""R2: top-k on logits → softmax over the k selected (GraniteMoE, GPT-OSS, ...)."""

GRANITE_AUX_UNRECORDED = tuple(
    Expectation(
        "xfail",
        "upstream: GraniteMoePreTrainedModel._can_record_outputs has no 'router_logits' (5.6.2 "
        "modeling_granitemoe.py:454; the same in granitemoeshared, granitemoehybrid, granitemoe_swa), so "
        "outputs.router_logits is None and load_balancing_loss_func returns 0 (:573-574): the model trains "
        "without its load-balancing loss although output_router_logits=True; fixed in 5.18.0 "
        "(OutputRecorder(GraniteMoeTopKRouter, index=0))",
        check=check,
        releases=">=5.0,<5.18",
    )
    for check in ("aux_loss", "grad_aux_loss")
)
"""GraniteMoE models before 5.18 record no router logits: the aux loss the model computes is 0."""


def router_probs_recorded(where: str) -> tuple[Expectation, ...]:
    """xfail of the aux loss and its gradient on 5.0–5.5, for a router that returns its softmax as
    its logits; ``where`` is the source line in the oldest release that has the model.

    Upstream the top-k router did ``router_logits = softmax(router_logits)`` and returned that as its
    first output, which ``OutputRecorder(<Router>, index=0)`` records as ``router_logits``;
    ``load_balancing_loss_func`` softmaxes again, so the model's aux loss is computed from
    softmax(softmax(logits)): flatter than the routing it balances, with a shrunken gradient.
    5.6.0 keeps the logits (``router_probs = softmax(router_logits)``).
    """
    reason = (
        f"upstream: the router overwrites its logits with their softmax and returns those ({where}: "
        "router_logits = softmax(router_logits)); the model records them as router_logits and "
        "load_balancing_loss_func softmaxes them again, so the aux loss and its gradient come from "
        "softmax(softmax(logits)); fixed in 5.6.0 (router_probs)"
    )
    return tuple(
        Expectation("xfail", reason, check=check, releases=">=5.0,<5.6") for check in ("aux_loss", "grad_aux_loss")
    )


WEIGHTING_CHECKS = (
    "routing_weights",
    "output",
    "grad_input",
    "grad_router",
    "grad_experts",
    # the adversarial steps: other weights change every output, hence every gradient and parameter after
    # step 0, hence which experts step 1 leaves idle
    "partition_output",
    "partition_grads",
    "partition_zero_grads",
    "partition_params",
)
"""The checks a wrong routing-weight normalisation (an ignored ``norm_topk_prob``) turns red."""


CORE_ENTRIES: tuple[ArchEntry, ...] = (
    ArchEntry(
        model_type="mixtral",
        config_class="MixtralConfig",
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=I,
            num_local_experts=E,
            num_experts_per_tok=K,
            num_hidden_layers=1,
            router_jitter_noise=0.0,
            router_aux_loss_coef=0.02,
            output_router_logits=True,
            **ATTENTION,
        ),
        block_class="MixtralSparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="MixtralForCausalLM",
        spec=MoESpec(E, K, H, I, router=softmax_topk(renorm="always"), losses=SWITCH_AUX),
        params=(Binding("gate.weight", ("router.weight",)),) + FUSED_EXPERTS,
        router_path="gate",
        experts_path="experts",
        aux_coef_attr="router_aux_loss_coef",
        expectations=router_probs_recorded("5.0.0 modeling_mixtral.py:113"),
        published=(Published("mistralai/Mixtral-8x7B-v0.1", {"num_local_experts": 8, "num_experts_per_tok": 2}),),
    ),
    ArchEntry(
        model_type="qwen2_moe",
        config_class="Qwen2MoeConfig",
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
            router_aux_loss_coef=0.02,
            output_router_logits=True,
            **ATTENTION,
        ),
        block_class="Qwen2MoeSparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="Qwen2MoeForCausalLM",
        spec=MoESpec(
            E, K, H, I, router=softmax_topk(renorm="never"), shared=SharedSpec(S, gate="sigmoid"), losses=SWITCH_AUX
        ),
        params=(Binding("gate.weight", ("router.weight",)),)
        + FUSED_EXPERTS
        + shared_mlp("shared_expert", gate="shared_expert_gate"),
        router_path="gate",
        experts_path="experts",
        aux_coef_attr="router_aux_loss_coef",
        expectations=router_probs_recorded("5.0.0 modeling_qwen2_moe.py:349"),
        published=(
            Published("Qwen/Qwen1.5-MoE-A2.7B", {"num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": False}),
        ),
    ),
    ArchEntry(
        model_type="qwen3_moe",
        config_class="Qwen3MoeConfig",
        # norm_topk_prob=True: the renormalise-by-flag path (qwen2_moe/olmoe cover the flag's default, off).
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=48,
            moe_intermediate_size=I,
            num_experts=E,
            num_experts_per_tok=K,
            norm_topk_prob=True,
            num_hidden_layers=1,
            head_dim=8,
            router_aux_loss_coef=0.02,
            output_router_logits=True,
            **ATTENTION,
        ),
        block_class="Qwen3MoeSparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="Qwen3MoeForCausalLM",
        spec=MoESpec(E, K, H, I, router=softmax_topk(renorm="always"), losses=SWITCH_AUX),
        params=(Binding("gate.weight", ("router.weight",)),) + FUSED_EXPERTS,
        router_path="gate",
        experts_path="experts",
        aux_coef_attr="router_aux_loss_coef",
        expectations=router_probs_recorded("5.0.0 modeling_qwen3_moe.py:269"),
        published=(
            Published("Qwen/Qwen3-30B-A3B", {"num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True}),
        ),
    ),
    ArchEntry(
        model_type="deepseek_v3",
        config_class="DeepseekV3Config",
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=48,
            moe_intermediate_size=I,
            n_routed_experts=E,
            num_experts_per_tok=K,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            first_k_dense_replace=0,
            num_hidden_layers=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            head_dim=8,
            **ATTENTION,
        ),
        block_class="DeepseekV3MoE",
        block_path="model.layers.0.mlp",
        model_class="DeepseekV3ForCausalLM",
        spec=MoESpec(
            E,
            K,
            H,
            I,
            router=RouterSpec(
                scoring="sigmoid",
                select_on="scores",
                selection_bias=True,
                weight_from="scores",
                renorm="always",
                renorm_eps=1e-20,
                group_limit=GroupLimit(n_group=2, topk_group=1),
                routed_scaling=2.5,
            ),
            shared=SharedSpec(I),
        ),
        params=(
            Binding("gate.weight", ("router.weight",)),
            Binding("gate.e_score_correction_bias", ("router.selection_bias",)),
        )
        + FUSED_EXPERTS
        + shared_mlp("shared_experts"),
        router_path="gate",
        experts_path="experts",
        expectations=(
            Expectation(
                "xfail",
                "upstream: DeepseekV3TopkRouter masks the experts of the dropped groups with -inf and takes "
                "torch.topk(k) of all E (modeling_deepseek_v3.py:151-152 in transformers 5.24); DeepseekV3Config "
                "never checks num_experts_per_tok <= topk_group × n_routed_experts / n_group, so k beyond the "
                "kept groups' experts routes to masked experts (their unbiased sigmoid as weight) in silence",
                check="config_rejects_invalid",
                config="invalid:kept",
            ),
        ),
        published=(
            Published(
                "deepseek-ai/DeepSeek-V3",
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
    ),
    ArchEntry(
        model_type="gpt_oss",
        config_class="GptOssConfig",
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=I,
            num_local_experts=E,
            num_experts_per_tok=K,
            num_hidden_layers=1,
            head_dim=8,
            layer_types=["full_attention"],
            router_aux_loss_coef=0.02,
            output_router_logits=True,
            **ATTENTION,
        ),
        block_class="GptOssMLP",
        block_path="model.layers.0.mlp",
        model_class="GptOssForCausalLM",
        spec=MoESpec(
            E,
            K,
            H,
            I,
            router=RouterSpec(
                scoring="softmax", logit_bias=True, select_on="logits", weight_from="softmax_of_selected_logits"
            ),
            experts=ExpertSpec(glu="gptoss_clamped", bias=True),
            losses=SWITCH_AUX,
        ),
        params=(
            Binding("router.weight", ("router.weight",)),
            Binding("router.bias", ("router.bias",)),
            Binding("experts.gate_up_proj", ("experts.w_gate", "experts.w_up"), "gate_up_cols_interleaved"),
            Binding("experts.gate_up_proj_bias", ("experts.b_gate", "experts.b_up"), "gate_up_bias_interleaved"),
            Binding("experts.down_proj", ("experts.w_down",), "transposed"),
            Binding("experts.down_proj_bias", ("experts.b_down",)),
        ),
        router_path="router",
        experts_path="experts",
        aux_coef_attr="router_aux_loss_coef",
        config_fields=(FieldRule("swiglu_limit", "swiglu_limit"), FieldRule("swiglu_alpha", "swiglu_alpha")),
        published=(
            Published("openai/gpt-oss-20b", {"num_local_experts": 32, "num_experts_per_tok": 4, "swiglu_limit": 7.0}),
        ),
    ),
    ArchEntry(
        model_type="jamba",
        config_class="JambaConfig",
        # Layer 1 is the MoE layer (expert_layer_period=2, offset=1); layer 0 is the one attention layer.
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=I,
            num_experts=E,
            num_experts_per_tok=K,
            num_hidden_layers=2,
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,
            attn_layer_offset=0,
            mamba_d_state=4,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=4,
            use_mamba_kernels=False,
            router_aux_loss_coef=0.02,
            output_router_logits=True,
            **ATTENTION,
        ),
        block_class="JambaSparseMoeBlock",
        block_path="model.layers.1.feed_forward",
        model_class="JambaForCausalLM",
        spec=MoESpec(E, K, H, I, router=softmax_topk(renorm="never"), losses=SWITCH_AUX),
        params=(Binding("router.weight", ("router.weight",)),) + FUSED_EXPERTS,
        router_path="router",
        experts_path="experts",
        aux_coef_attr="router_aux_loss_coef",
        published=(Published("ai21labs/Jamba-v0.1", {"num_experts": 16, "num_experts_per_tok": 2}),),
    ),
    ArchEntry(
        model_type="granitemoe",
        config_class="GraniteMoeConfig",
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=I,
            num_local_experts=E,
            num_experts_per_tok=K,
            num_hidden_layers=1,
            router_aux_loss_coef=0.02,
            output_router_logits=True,
            **ATTENTION,
        ),
        block_class="GraniteMoeMoE",
        block_path="model.layers.0.block_sparse_moe",
        model_class="GraniteMoeForCausalLM",
        spec=MoESpec(E, K, H, I, router=TOPK_THEN_SOFTMAX, losses=SWITCH_AUX),
        params=(Binding("router.weight", ("router.weight",)),) + FUSED_EXPERTS,
        router_path="router",
        experts_path="experts",
        aux_coef_attr="router_aux_loss_coef",
        expectations=GRANITE_AUX_UNRECORDED,
        published=(
            Published("ibm-granite/granite-3.0-3b-a800m-base", {"num_local_experts": 40, "num_experts_per_tok": 8}),
        ),
    ),
    ArchEntry(
        model_type="olmoe",
        config_class="OlmoeConfig",
        config_kwargs=dict(
            hidden_size=H,
            intermediate_size=I,
            num_experts=E,
            num_experts_per_tok=K,
            norm_topk_prob=False,
            num_hidden_layers=1,
            router_aux_loss_coef=0.02,
            output_router_logits=True,
            **ATTENTION,
        ),
        block_class="OlmoeSparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="OlmoeForCausalLM",
        spec=MoESpec(E, K, H, I, router=softmax_topk(renorm="never"), losses=SWITCH_AUX),
        params=(Binding("gate.weight", ("router.weight",)),) + FUSED_EXPERTS,
        router_path="gate",
        experts_path="experts",
        aux_coef_attr="router_aux_loss_coef",
        expectations=router_probs_recorded("5.0.0 modeling_olmoe.py:356"),
        published=(
            Published(
                "allenai/OLMoE-1B-7B-0924", {"num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False}
            ),
        ),
    ),
    ArchEntry(
        model_type="dbrx",
        config_class="DbrxConfig",
        # moe_normalize_expert_weights=2: a p-norm that differs from the plain sum, so the p is tested.
        config_kwargs=dict(
            d_model=H,
            n_heads=4,
            n_layers=1,
            vocab_size=128,
            max_seq_len=64,
            output_router_logits=True,
            attn_config={"kv_n_heads": 4, "rope_theta": 1e4, "clip_qkv": 8.0},
            ffn_config={
                "ffn_hidden_size": I,
                "moe_num_experts": E,
                "moe_top_k": K,
                "moe_jitter_eps": None,
                "moe_normalize_expert_weights": 2.0,
                "moe_loss_weight": 0.02,
                "ffn_act_fn": {"name": "silu"},
            },
        ),
        block_class="DbrxFFN",
        block_path="transformer.blocks.0.ffn",
        model_class="DbrxForCausalLM",
        spec=MoESpec(E, K, H, I, router=RouterSpec(renorm="pnorm", renorm_p=2.0), losses=SWITCH_AUX),
        params=(
            Binding("router.layer.weight", ("router.weight",)),
            Binding("experts.mlp.w1", ("experts.w_gate",), "flat_experts"),
            Binding("experts.mlp.v1", ("experts.w_up",), "flat_experts"),
            Binding("experts.mlp.w2", ("experts.w_down",), "flat_experts_transposed"),
        ),
        router_path="router",
        router_logits_index=None,
        experts_path="experts",
        aux_coef_attr="ffn_config.moe_loss_weight",
        experts_implementations=("eager",),
        # every routing field sits in the ffn_config sub-config (a DbrxFFNConfig; a dict in the kwargs)
        config_fields=(
            FieldRule("ffn_config.ffn_hidden_size", "intermediate"),
            FieldRule("ffn_config.moe_num_experts", "num_experts"),
            FieldRule("ffn_config.moe_top_k", "top_k"),
            FieldRule("ffn_config.moe_normalize_expert_weights", "pnorm"),
        ),
        published=(
            Published(
                "databricks/dbrx-base",
                {
                    "ffn_config.moe_num_experts": 16,
                    "ffn_config.moe_top_k": 4,
                    # NOTE: config.json has the int 1, which DbrxFFNConfig refuses (upstream: it declares
                    # moe_normalize_expert_weights: float | None, configuration_dbrx.py:79 in transformers 5.24, and its
                    # strict validation raises StrictDataclassFieldValidationError, so from_pretrained cannot load
                    # the checkpoint's own config); a config the class rejects is an error no declaration excuses,
                    # so the sample runs the same p as a float.
                    "ffn_config.moe_normalize_expert_weights": 1.0,
                },
            ),
        ),
        expectations=(
            Expectation(
                "skip",
                "upstream: DbrxRouter builds its Linear on ffn_hidden_size instead of the model width "
                "(5.6.2 modeling_dbrx.py:331, self.hidden_size = config.ffn_hidden_size), so the block cannot "
                "take [N, d_model] inputs whenever ffn_hidden_size != d_model (every DBRX checkpoint: 6144 vs "
                "10752); fixed in 5.15.0 (config.hidden_size)",
                releases=">=5.0,<5.15",
            ),
        ),
    ),
    ArchEntry(
        model_type="llama4",
        config_class="Llama4Config",
        config_kwargs=dict(
            text_config=dict(
                hidden_size=H,
                intermediate_size=I,
                intermediate_size_mlp=48,
                num_local_experts=E,
                num_experts_per_tok=K,
                num_hidden_layers=1,
                head_dim=8,
                interleave_moe_layer_step=1,
                no_rope_layers=[1],
                **ATTENTION,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                image_size=32,
                patch_size=16,
                vision_output_dim=32,
                projector_input_dim=32,
                projector_output_dim=32,
            ),
        ),
        block_class="Llama4TextMoe",
        block_path="language_model.model.layers.0.feed_forward",
        model_class="Llama4ForConditionalGeneration",
        block_config_attr="text_config",
        # Sigmoid of the top-k logits, no renormalisation, and the weight scales the expert *input*.
        spec=MoESpec(
            E,
            K,
            H,
            I,
            router=RouterSpec(scoring="sigmoid", select_on="logits", weight_from="sigmoid_of_selected_logits"),
            experts=ExpertSpec(weight_site="input"),
            shared=SharedSpec(I),
        ),
        params=(
            Binding("router.weight", ("router.weight",)),
            Binding("experts.gate_up_proj", ("experts.w_gate", "experts.w_up"), "gate_up_cols"),
            Binding("experts.down_proj", ("experts.w_down",), "transposed"),
        )
        + shared_mlp("shared_expert"),
        router_path="router",
        router_logits_index=1,
        routing_from="router_dense_scores",
        experts_path="experts",
        experts_implementations=("eager",),
        published=(Published("meta-llama/Llama-4-Scout-17B-16E", {"num_local_experts": 16, "num_experts_per_tok": 1}),),
    ),
)
