"""Registry entries: Inkling's router-gated shared experts, and the Dots3-Note vision tower's MoE (data, not
code; see core.py for the shared tiny sizes).

- **inkling_text**, **inkling_mm_model** — the router has ``E + n`` rows: the first ``E`` are the routed
  experts (sigmoid + selection bias, top-k), the last ``n`` score the ``n`` shared experts. The k picked and
  the ``n`` shared logits are weighted together, ``softmax(logsigmoid([ℓ_picked, ℓ_shared]))`` =
  ``σ(ℓ_i) / Σ_{k+n} σ``, times ``route_scale`` and the trained ``global_scale``; the shared experts are
  separate MLPs, each multiplied by its own slot's weight (``InklingTopkRouter.forward`` /
  ``InklingSharedExperts.forward``, ``models/inkling/modeling_inkling.py:348-398``). Spec:
  ``RouterSpec.shared_slots``, ``learned_scale`` (canonical ``router.scale``), ``SharedSpec(gate="router")``.
- **dots3_note_vision_encoder** — the vision tower's ``Dots3NoteVisionMoE`` (``models/dots3_note/
  modeling_dots3_note.py:1293-1336``): the DeepSeek-V3 router of the text MoE without groups (sigmoid,
  selection bias held by the *block*, renormalised ``/ (Σ + 1e-20)``, ``× router_scaling_factor``), the text
  MoE's experts class, no shared experts. Built from the vision config with its ``layer_idx``
  (``per_layer_config[layer_idx]`` gives that layer's expert count).

docs/router-families.md ('Router-gated shared experts') and docs/transformers-moe-landscape.md ('Inkling and
the Dots3-Note vision MoE') give the formulas, the upstream lines and the upstream findings.
"""

from __future__ import annotations

from moeconf.registry.config_space import FieldRule
from moeconf.registry.core import ATTENTION, FUSED_EXPERTS, E, H, I, K
from moeconf.registry.deepseek_family import sigmoid_router
from moeconf.registry.entry import ArchEntry, Binding, Expectation, sub_config_variant
from moeconf.registry.sigmoid_family import BLOCK_BIAS, GATE, GATE_BIAS
from moeconf.spec import MoESpec, RouterSpec, SharedSpec

INKLING_SHARED = 2
"""Shared experts of the tiny Inkling config (the checkpoint's default): two slots, so that a router that
gave both shared experts the same weight (or swapped them) cannot pass."""

INKLING_ROUTE_SCALE = 2.5
"""``route_scale`` of the tiny config (8.0 by default): not 1, so that forgetting it is visible."""

INKLING_TEXT = {
    "hidden_size": H,
    "intermediate_size": 40,  # the dense MLP's width; every layer here is sparse
    "moe_intermediate_size": I,  # routed and shared experts alike
    "n_routed_experts": E,
    "num_experts_per_tok": K,
    "n_shared_experts": INKLING_SHARED,
    "route_scale": INKLING_ROUTE_SCALE,
    "num_hidden_layers": 1,
    "num_attention_heads": ATTENTION["num_attention_heads"],
    "num_key_value_heads": 2,
    "head_dim": 8,
    "swa_num_attention_heads": ATTENTION["num_attention_heads"],
    "swa_num_key_value_heads": 2,
    "swa_head_dim": 8,
    "sliding_window_size": 16,
    "d_rel": 4,
    "rel_extent": 16,
    "vocab_size": ATTENTION["vocab_size"],
    "max_position_embeddings": ATTENTION["max_position_embeddings"],
}

INKLING_ROUTER = RouterSpec(
    scoring="sigmoid",
    select_on="scores",
    selection_bias=True,  # e_score_correction_bias, a buffer: it steers the choice only
    weight_from="scores",
    renorm="always",  # exp(logσ − logsumexp(logσ)) over the k + n slots is σ / Σσ, with no eps
    routed_scaling=INKLING_ROUTE_SCALE,
    shared_slots=INKLING_SHARED,
    learned_scale=True,  # gate.global_scale, an nn.Parameter
)

INKLING_SPEC = MoESpec(E, K, H, I, router=INKLING_ROUTER, shared=SharedSpec(I, gate="router"))

INKLING_BLOCK = (
    GATE
    + GATE_BIAS
    + (Binding("gate.global_scale", ("router.scale",)),)
    + FUSED_EXPERTS
    + (
        # [n, S, H] / [n, H, S] stacks, used as bmm(x, W.transpose(1, 2)): the canonical stacked layout.
        Binding("shared_experts.gate_proj", ("shared.w_gate",)),
        Binding("shared_experts.up_proj", ("shared.w_up",)),
        Binding("shared_experts.down_proj", ("shared.w_down",)),
    )
)

INKLING_MM = ArchEntry(
    model_type="inkling_mm_model",
    config_class="InklingConfig",
    config_kwargs={
        "text_config": dict(INKLING_TEXT),
        # NOTE: at least as many vision layers as planned scales (1 + prime factors of the patch sizes): with
        # fewer, plan_out_scales imports scipy (modeling_inkling.py:959-963), which the dev venv does not have.
        "vision_config": {"num_hidden_layers": 3, "patch_size": 2, "temporal_patch_size": 2, "hidden_size": 32},
        "audio_config": {"n_mel_bins": 4, "mel_vocab_size": 8},
    },
    modeling_module="transformers.models.inkling.modeling_inkling",
    block_class="InklingMoE",
    block_path="model.language_model.layers.0.mlp",
    model_class="InklingForConditionalGeneration",
    block_config_attr="text_config",
    spec=INKLING_SPEC,
    params=INKLING_BLOCK,
    router_path="gate",
    experts_path="experts",
    # InklingTopkRouter: topk_weights × route_scale × global_scale (modeling_inkling.py, InklingTopkRouter.forward)
    config_fields=(FieldRule("route_scale", "routed_scaling"),),
)

DOTS3_VISION = {
    "num_hidden_layers": 1,
    "hidden_size": H,
    "num_attention_heads": 4,
    "intermediate_size": 40,  # the dense vision MLP's width; the one layer here is sparse
    "moe_intermediate_size": I,
    "num_local_experts": E,
    # The checkpoint form: routed experts per layer (-1: dense); becomes mlp_layer_types + per_layer_config.
    "pyramid_num_routed": [E],
    "num_experts_per_tok": K,
    "router_scaling_factor": 1.5,  # 1.0 by default: not 1, so that forgetting it is visible
    "adapter_in_dim": H,
    "adapter_out_dim": H,
}

DOTS3_NOTE_VISION = ArchEntry(
    model_type="dots3_note_vision_encoder",
    config_class="Dots3NoteVisionConfig",
    config_kwargs=DOTS3_VISION,
    modeling_module="transformers.models.dots3_note.modeling_dots3_note",
    block_class="Dots3NoteVisionMoE",
    block_path="blocks.0.mlp",
    model_class="Dots3NoteVisionModel",
    # Dots3NoteVisionMoE(config, layer_idx) reads config.per_layer_config[layer_idx].
    block_init="config_and_layer_idx",
    # Dots3NoteVisionTopKRouter.forward: sigmoid(fp32 logits), top-k of scores + bias, unbiased scores
    # / (Σ + 1e-20) × router_scaling_factor (modeling_dots3_note.py:1305-1319): R3 without groups.
    spec=MoESpec(E, K, H, I, router=sigmoid_router(renorm=True, routed_scaling=1.5, group_limit=None)),
    params=GATE + BLOCK_BIAS + FUSED_EXPERTS,
    router_path="gate",
    experts_path="experts",
    config_fields=(
        FieldRule(
            "num_local_experts",
            None,
            why="per-layer: the block reads per_layer_config[layer_idx].num_local_experts, which pyramid_num_routed "
            "sets (configuration_dots3_note.py:87-93); the global value is only the class default, and a global read "
            "of a heterogeneous config is refused (AmbiguousGlobalPerLayerAttributeError)",
        ),
        FieldRule("router_scaling_factor", "routed_scaling"),
    ),
    expectations=(
        Expectation(
            "xfail",
            "upstream: Dots3NoteVisionConfig clamps num_experts_per_tok to each layer's expert count "
            "(per_layer_config[i].num_experts_per_tok = min(num_experts_per_tok, count), "
            "configuration_dots3_note.py:92 in transformers 5.24), so k > E is accepted in silence and the "
            "block routes to every expert",
            check="config_rejects_invalid",
            config="invalid:top_k",
        ),
    ),
)

ENTRIES: tuple[ArchEntry, ...] = (
    INKLING_MM,
    sub_config_variant(
        INKLING_MM,
        model_type="inkling_text",
        config_class="InklingTextConfig",
        block_path="model.layers.0.mlp",
        model_class="InklingForCausalLM",
    ),
    DOTS3_NOTE_VISION,
)
