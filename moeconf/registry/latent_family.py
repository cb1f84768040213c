"""Registry entries: latent MoE (Muse Spark; data, not code; see core.py for the shared tiny sizes).

``MuseSparkMoE`` (``models/muse_spark/modeling_muse_spark.py:233-250``, transformers 5.24) routes the hidden
state ``x [N, H]`` itself, but its experts run at ``moe_hidden_size`` = L:

    out = P_post · Σ_i w_i · RMSNorm_before(E_i(RMSNorm_after(P_pre · x)))

- router (``MuseSparkTopkRouter``, ``:162-187``): fp32 logits ``x Wᵀ × output_multiplier``, sigmoid, top-k of
  (scores + ``e_score_correction_bias``), gathered unbiased scores ``/ (Σ + 1e-15)``, ``× routed_scaling_factor``
  (R4 with a logit multiplier);
- ``pre_expert_proj`` ``[L, H]`` then ``MuseSparkTextCenteredRMSNorm`` (``:107-124``): ``(1 + w) · z / rms(z)``,
  eps ``rms_norm_eps`` (``LatentSpec.pre_norm="scale_after"``, ``scale_offset=1``);
- SwiGLU experts at width L (``gate_up_proj [E, 2I, L]``), each output normed by ``MuseSparkTextInputScaledRMSNorm``
  (``:127-143``): ``u / rms(u)``, ``u = (1 + w) · y``, eps ``post_norm_eps`` (``post_norm="scale_before"``), then
  weighted (``:227-229``);
- ``post_expert_proj`` ``[H, L]``. No shared experts, no biases, no load-balancing loss (the model records the
  router logits, ``:576``, but no forward computes a loss from them).

docs/router-families.md ('Latent MoE') gives the formula; docs/transformers-moe-landscape.md ('Muse Spark')
the upstream findings.
"""

from __future__ import annotations

from moeconf.registry.config_space import FieldRule
from moeconf.registry.core import ATTENTION, FUSED_EXPERTS, E, H, I, K
from moeconf.registry.deepseek_family import TOKENS
from moeconf.registry.entry import ArchEntry, Binding, sub_config_variant
from moeconf.registry.sigmoid_family import sigmoid_router
from moeconf.spec import LatentSpec, MoESpec

L = 16
"""Latent (expert) width ``moe_hidden_size``: ≠ H, ≠ I, ≠ 2I, so a projection applied on the wrong side, a
transposed latent weight or experts run at H cannot load. NOTE: a multiple of 8: ``torch._grouped_mm``
(hf-grouped-mm) needs 16-byte strides, which a bf16 row of 20 (40 bytes) is not."""

PRE_NORM_EPS = 0.5
"""``rms_norm_eps`` of the tiny config. NOTE: the projected input has mean square ≈ 1 (unit tokens, fan-in scaled
``P_pre``); at the default 1e-5 a norm that dropped or swapped its eps would still pass. At 0.5 it moves the
normalised value by ~20 %."""

POST_NORM_EPS = 2.0
"""``post_norm_eps`` of the tiny config (default 1e-8). NOTE: the scaled expert outputs ``u = (1 + w) · y`` have
a mean square of ~10-12 on average and ~0.15-0.2 at the smallest (seeds 0-3, 256 tokens, all experts), so eps 2 is a
visible share of it: the two norms' eps are told apart, and neither can be dropped unnoticed."""

OUTPUT_MULTIPLIER = 0.7
ROUTED_SCALING = 2.5

MUSE_SPARK_TEXT = dict(
    hidden_size=H,
    intermediate_size=48,  # the dense MLP of "dense" layers; the one layer here is sparse
    moe_intermediate_size=I,
    moe_hidden_size=L,
    num_local_experts=E,
    num_experts_per_tok=K,
    num_hidden_layers=1,
    mlp_layer_types=["sparse"],
    head_dim=8,
    sliding_window=16,
    rms_norm_eps=PRE_NORM_EPS,
    post_norm_eps=POST_NORM_EPS,
    output_multiplier=OUTPUT_MULTIPLIER,
    routed_scaling_factor=ROUTED_SCALING,
    **ATTENTION,
    **TOKENS,
)

MUSE_SPARK_SPEC = MoESpec(
    E,
    K,
    H,
    I,
    # Logits × output_multiplier before the sigmoid; 1e-15 in the renormalisation (modeling_muse_spark.py:176, :185).
    router=sigmoid_router(logit_multiplier=OUTPUT_MULTIPLIER, renorm_eps=1e-15, routed_scaling=ROUTED_SCALING),
    latent=LatentSpec(
        width=L,
        pre_norm_eps=PRE_NORM_EPS,
        post_norm_eps=POST_NORM_EPS,
        pre_norm="scale_after",
        post_norm="scale_before",
        scale_offset=1.0,
    ),
)

MUSE_SPARK_PARAMS = (
    Binding("gate.weight", ("router.weight",)),
    Binding("gate.e_score_correction_bias", ("router.selection_bias",)),
    Binding("pre_expert_proj.weight", ("latent.w_pre",)),
    Binding("pre_expert_norm.weight", ("latent.pre_norm.weight",)),
    Binding("experts.post_expert_norm.weight", ("latent.post_norm.weight",)),
    Binding("post_expert_proj.weight", ("latent.w_post",)),
) + FUSED_EXPERTS

MUSE_SPARK = ArchEntry(
    model_type="muse_spark",
    config_class="MuseSparkConfig",
    config_kwargs={
        "text_config": MUSE_SPARK_TEXT,
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "out_hidden_size": 32,
        },
        # The audio encoder's output is scattered onto the text embeddings: out_hidden_size must be H.
        "audio_config": {
            "hidden_sizes": [8, 16],
            "patch_sizes": [2, 2],
            "depths": [1, 1],
            "num_hidden_layers": 2,
            "out_hidden_size": H,
        },
        "out_hidden_size": 32,
        "projector_hidden_size": 32,
    },
    block_class="MuseSparkMoE",
    block_path="model.language_model.layers.0.mlp",
    model_class="MuseSparkForConditionalGeneration",
    block_config_attr="text_config",
    spec=MUSE_SPARK_SPEC,
    params=MUSE_SPARK_PARAMS,
    router_path="gate",
    experts_path="experts",
    # MuseSparkTopkRouter.forward: router_logits × output_multiplier before the sigmoid
    config_fields=(FieldRule("output_multiplier", "logit_multiplier"),),
)

ENTRIES: tuple[ArchEntry, ...] = (
    MUSE_SPARK,
    sub_config_variant(
        MUSE_SPARK,
        model_type="muse_spark_text",
        config_class="MuseSparkTextConfig",
        block_path="layers.0.mlp",
        model_class="MuseSparkTextModel",
    ),
)
