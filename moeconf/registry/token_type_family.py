"""Registry entries: blocks whose expert set is chosen per token by a token-type id (data, not code; see
core.py for the shared tiny sizes).

- **ernie4_5_vl_moe** / **ernie4_5_vl_moe_text** — ``Ernie4_5_VLMoeMoeBlock`` holds two routed sub-MoEs,
  ``text_moe`` and ``vision_moe`` (each an ERNIE-4.5 router: softmax, selection bias, weights
  ``p / max(Σ, moe_norm_min)``, and fused experts of its own width ``moe_intermediate_size[s]``). The forward
  keyword ``moe_mm_token_type_ids [B, S]`` sends type 0 (text) to ``text_moe`` and types 1, 2 (image, video:
  ``.bool()``) to ``vision_moe``; the shared experts see every token
  (``models/ernie4_5_vl_moe/modeling_ernie4_5_vl_moe.py:419-481``). Spec: ``MoESpec.token_sets``; the
  vision set's parameters are the canonical ones qualified ``@1``.

docs/router-families.md ('Token-type expert sets') and docs/transformers-moe-landscape.md ('ERNIE-4.5-VL')
give the formulas, the upstream lines and the upstream findings.
"""

from __future__ import annotations

from dataclasses import replace

from moeconf.registry.config_space import FieldRule
from moeconf.registry.core import ATTENTION, SWITCH_AUX, E, H, I, K, shared_mlp
from moeconf.registry.entry import ArchEntry, Binding, Expectation, sub_config_variant
from moeconf.spec import LossSpec, MoESpec, RouterSpec, SharedSpec, TokenTypeSets

I_VISION = 40
"""The vision experts' width: ≠ H, ≠ I and ≠ 2I, so a vision tensor bound to the text set (or the
reverse) fails on its shape before any number is compared."""

SHARED_EXPERTS = 2
"""``moe_num_shared_experts``: the shared MLP is ``moe_intermediate_size[0] × 2`` wide (48), so a shared
expert sized from the vision width or without the factor fails on its shape."""

NORM_MIN = 1e-12

ERNIE_VL_TEXT = dict(
    hidden_size=H,
    intermediate_size=56,
    moe_intermediate_size=[I, I_VISION],
    moe_num_experts=E,
    moe_k=K,
    moe_num_shared_experts=SHARED_EXPERTS,
    moe_norm_min=NORM_MIN,
    # NOTE: the default puts a dense MLP at layer 0; the one tiny layer must be the sparse block.
    mlp_layer_types=["sparse"],
    # use_bias=False as every released checkpoint: with True the shared MLP gains biases the spec has no name for.
    use_bias=False,
    num_hidden_layers=1,
    router_aux_loss_coef=0.02,
    output_router_logits=True,
    # M-RoPE sections must add up to head_dim / 2 (32 / 4 heads / 2 = 4); the defaults need 64.
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [1, 1, 2]},
    **ATTENTION,
)

TINY_VISION_ERNIE = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, patch_size=4, spatial_merge_size=2)


def _ernie_router(prefix: str, *, token_set: int) -> tuple[Binding, ...]:
    """One sub-MoE's router weight and its ``moe_statics`` selection bias (a frozen ``[1, E]`` Parameter:
    ``flat_experts`` is the ``[E]`` ↔ ``[1, E]`` reshape)."""
    q = "" if token_set == 0 else f"@{token_set}"
    return (
        Binding(f"{prefix}.gate.weight", (f"router.weight{q}",)),
        Binding(f"{prefix}.gate.moe_statics.e_score_correction_bias", (f"router.selection_bias{q}",), "flat_experts"),
    )


def _ernie_experts(prefix: str, *, token_set: int) -> tuple[Binding, ...]:
    q = "" if token_set == 0 else f"@{token_set}"
    return (
        Binding(f"{prefix}.experts.gate_up_proj", (f"experts.w_gate{q}", f"experts.w_up{q}"), "gate_up_rows"),
        Binding(f"{prefix}.experts.down_proj", (f"experts.w_down{q}",)),
    )


ERNIE_VL_SPEC = MoESpec(
    E,
    K,
    H,
    I,
    router=RouterSpec(scoring="softmax", selection_bias=True, renorm="always", renorm_eps=NORM_MIN, renorm_clamp=True),
    shared=SharedSpec(I * SHARED_EXPERTS),
    losses=SWITCH_AUX,
    # Type ids 0 text, 1 image, 2 video; the block takes `moe_mm_token_type_ids.bool()` (modeling:461).
    token_sets=TokenTypeSets(set_of_type=(0, 1, 1), intermediates=(I, I_VISION)),
)

EMPTY_SET_NONE_GRADS = (
    "a token set called on zero rows leaves its router and experts with .grad None, not zeros: the eager "
    "experts loop hits no expert and returns a graph-less zeros_like (models/ernie4_5_vl_moe/"
    "modeling_ernie4_5_vl_moe.py:370-393), the set's only path from its router and experts to the output "
    "(modeling:466-471); ranks whose batch has no token of a set then skip its gradients (the ZeRO-2/FSDP "
    "reduce-scatter hang, DeepSpeed #5066). single_token is one vision token, so text_moe gets zero rows"
)
"""The one upstream deviation the cases reach: only the single-token case leaves a set empty, and only the eager
experts loop (transformers' grouped_mm keeps the graph on zero rows)."""

EXPECTATIONS = tuple(
    Expectation("xfail", EMPTY_SET_NONE_GRADS, check=check, backend="hf-eager", case="single_token")
    for check in ("grad_router", "grad_experts")
)

ERNIE4_5_VL_MOE = ArchEntry(
    model_type="ernie4_5_vl_moe",
    config_class="Ernie4_5_VLMoeConfig",
    config_kwargs=dict(text_config=ERNIE_VL_TEXT, vision_config=TINY_VISION_ERNIE),
    block_class="Ernie4_5_VLMoeMoeBlock",
    block_path="model.language_model.layers.0.mlp",
    model_class="Ernie4_5_VLMoeForConditionalGeneration",
    block_config_attr="text_config",
    spec=ERNIE_VL_SPEC,
    # one expert width per token set (moe_intermediate_size[s]); shared MLP moe_intermediate_size[0] × count
    config_fields=(
        FieldRule("moe_intermediate_size", "set_intermediates"),
        FieldRule("intermediate_size", None, why="the dense MLP's width (the experts' is moe_intermediate_size)"),
        FieldRule("moe_num_shared_experts", "shared_multiple"),
        # Ernie4_5_VLMoeMoeTopKRouter: weights / clamp(Σ, min=moe_norm_min)
        FieldRule("moe_norm_min", "renorm_eps"),
    ),
    params=_ernie_router("text_moe", token_set=0)
    + _ernie_experts("text_moe", token_set=0)
    + _ernie_router("vision_moe", token_set=1)
    + _ernie_experts("vision_moe", token_set=1)
    + shared_mlp("shared_experts"),
    # The block returns (output, router_logits): index 1 of its own output is what the model records
    # (`OutputRecorder(Ernie4_5_VLMoeMoeBlock, index=1)`, modeling:689); each sub-MoE's gate returns
    # (logits, weights, index) and its experts take (hidden, index, weights).
    router_path="text_moe.gate",
    router_logits_index=0,
    experts_path="text_moe.experts",
    token_set_modules=("text_moe", "vision_moe"),
    token_types_kwarg="moe_mm_token_type_ids",
    aux_coef_attr="text_config.router_aux_loss_coef",
    expectations=EXPECTATIONS,
)

ENTRIES: tuple[ArchEntry, ...] = (
    ERNIE4_5_VL_MOE,
    # The text model records the same router logits but computes no aux loss (Ernie4_5_VLMoeTextModel
    # returns MoeModelOutputWithPast; the loss is only in ...ForConditionalGeneration, modeling:1637-1646).
    sub_config_variant(
        ERNIE4_5_VL_MOE,
        model_type="ernie4_5_vl_moe_text",
        config_class="Ernie4_5_VLMoeTextConfig",
        block_path="layers.0.mlp",
        model_class="Ernie4_5_VLMoeTextModel",
        spec=replace(ERNIE_VL_SPEC, losses=LossSpec()),
        aux_coef_attr=None,
    ),
)
