"""Registry entries: Gemma 4 and DiffusionGemma, whose MoE has no block module (data, not code).

The router (``Gemma4TextRouter``) and experts (``Gemma4TextExperts``) are children of the decoder layer, next
to a dense MLP; the layer composes the MoE branch itself (``models/gemma4/modeling_gemma4.py:1391-1403``). The
block moeconf checks is that branch, ``moeconf.hf.adapters.Gemma4MoEBranch`` wrapped around a real layer
(``ArchEntry.block_adapter``): its parameters are the layer's own, and ``tests/test_gemma4_family.py`` checks
that it computes what the layer's ``forward`` adds to the feed-forward sum.

- Router (``:1294-1328``): ``softmax(proj(rms(x) ⊙ scale · H^-½))`` → top-k → renormalised → ``× per_expert_scale[i]``:
  R1 with ``RouterSpec.input_norm_eps`` (canonical ``router.input_norm.weight`` = ``scale``), ``logit_multiplier
  = H^-½`` (the same product: ``proj`` has no bias) and ``expert_scale`` (``router.expert_scale``).
- Experts: fused gate/up, ``gelu_pytorch_tanh``; they read ``pre_feedforward_layernorm_2(x)`` and their sum
  goes through ``post_feedforward_layernorm_2`` (``MoESpec.routed_input_norm_eps`` / ``routed_output_norm_eps``).
- No aux loss: no ``load_balancing_loss_func`` in either modeling file, ``Gemma4ForCausalLM.forward`` adds
  nothing to the loss. The model records the router's *probabilities* under ``router_logits``
  (``OutputRecorder(Gemma4TextRouter, index=0)``, ``:1539``; diffusion_gemma ``:887``, ``:1003``, ``:1192``).

docs/router-families.md ('Gemma 4') gives the formulas; docs/transformers-moe-landscape.md ('Gemma 4 and
DiffusionGemma') the upstream findings.
"""

from __future__ import annotations

from moeconf.registry.config_space import FieldRule
from moeconf.registry.core import FUSED_EXPERTS, E, H, I, K
from moeconf.registry.entry import ArchEntry, Binding
from moeconf.spec import ExpertSpec, MoESpec, RouterSpec

RMS_EPS = 1e-6
"""``rms_norm_eps`` of the tiny configs (the default); every norm of the layer reads it."""

TEXT_CONFIG = dict(
    hidden_size=H,
    intermediate_size=40,  # the dense MLP beside the MoE: not part of the block, any width
    moe_intermediate_size=I,
    num_experts=E,
    top_k_experts=K,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    global_head_dim=8,
    layer_types=["full_attention"],
    hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=RMS_EPS,
    vocab_size=128,
    max_position_embeddings=64,
)
"""The keys both text configs (``Gemma4TextConfig``, ``DiffusionGemmaTextConfig``) take."""

GEMMA4_TEXT_CONFIG = dict(
    TEXT_CONFIG,
    enable_moe_block=True,  # Gemma4 layers are dense unless asked (DiffusionGemma layers always have the MoE)
    hidden_size_per_layer_input=0,  # no per-layer embeddings (PLE): a dense path after the MoE
    vocab_size_per_layer_input=128,
)

GEMMA4_SPEC = MoESpec(
    E,
    K,
    H,
    I,
    router=RouterSpec(
        scoring="softmax",
        renorm="always",
        input_norm_eps=RMS_EPS,
        logit_multiplier=H**-0.5,
        expert_scale=True,
    ),
    experts=ExpertSpec(activation="gelu_tanh"),
    routed_input_norm_eps=RMS_EPS,
    routed_output_norm_eps=RMS_EPS,
)

BINDINGS = (
    Binding("router.proj.weight", ("router.weight",)),
    Binding("router.scale", ("router.input_norm.weight",)),
    Binding("router.per_expert_scale", ("router.expert_scale",)),
    *FUSED_EXPERTS,  # gate rows first: chunk(2) → act(gate) · up (:1285)
    Binding("pre_feedforward_layernorm_2.weight", ("routed_input_norm.weight",)),
    Binding("post_feedforward_layernorm_2.weight", ("routed_output_norm.weight",)),
)

ADAPTER = "moeconf.hf.adapters:Gemma4MoEBranch"


def _entry(
    *,
    model_type: str,
    config_class: str,
    config_kwargs: dict,
    layer_class: str,
    experts_class: str,
    block_path: str,
    model_class: str,
    modeling_module: str = "",
    block_config_attr: str | None = None,
) -> ArchEntry:
    """One Gemma-4-style entry: the MoE branch of ``layer_class`` at ``block_path`` (``modeling_module``
    derived from ``model_type`` unless given)."""
    return ArchEntry(
        model_type=model_type,
        config_class=config_class,
        config_kwargs=config_kwargs,
        modeling_module=modeling_module,
        block_class=layer_class,
        block_path=block_path,
        model_class=model_class,
        spec=GEMMA4_SPEC,
        params=BINDINGS,
        router_path="router",
        # Index 0 holds the softmax probabilities, not logits; nothing upstream computes a loss from them.
        router_logits_index=0,
        experts_path="experts",
        block_init="config_and_layer_idx",
        block_config_attr=block_config_attr,
        block_adapter=ADAPTER,
        # The module holding every expert weight (as 5.x fused experts); the decoder layer would be attention too.
        leaf_classes=(experts_class,),
        # Gemma4TextRouter.forward: torch.topk(..., k=self.config.top_k_experts) (not num_experts_per_tok)
        config_fields=(FieldRule("top_k_experts", "top_k"),),
    )


ENTRIES: tuple[ArchEntry, ...] = (
    _entry(
        model_type="gemma4_text",
        config_class="Gemma4TextConfig",
        config_kwargs=GEMMA4_TEXT_CONFIG,
        layer_class="Gemma4TextDecoderLayer",
        experts_class="Gemma4TextExperts",
        block_path="model.layers.0",
        model_class="Gemma4ForCausalLM",
        modeling_module="transformers.models.gemma4.modeling_gemma4",
    ),
    _entry(
        model_type="gemma4",
        config_class="Gemma4Config",
        config_kwargs=dict(text_config=GEMMA4_TEXT_CONFIG, vision_config=None, audio_config=None),
        layer_class="Gemma4TextDecoderLayer",
        experts_class="Gemma4TextExperts",
        block_path="model.language_model.layers.0",
        model_class="Gemma4ForConditionalGeneration",
        block_config_attr="text_config",
    ),
    # DiffusionGemma has two layer classes with the same MoE branch (the decoder's weights are tied to the
    # encoder's, modeling_diffusion_gemma.py:1469-1476): the composite checks the decoder layer, the text model
    # the encoder layer, so that the harness runs both.
    _entry(
        model_type="diffusion_gemma",
        config_class="DiffusionGemmaConfig",
        config_kwargs=dict(text_config=TEXT_CONFIG, vision_config=None),
        layer_class="DiffusionGemmaDecoderTextLayer",
        experts_class="DiffusionGemmaTextExperts",
        block_path="model.decoder.layers.0",
        model_class="DiffusionGemmaForBlockDiffusion",
        block_config_attr="text_config",
    ),
    _entry(
        model_type="diffusion_gemma_text",
        config_class="DiffusionGemmaTextConfig",
        config_kwargs=TEXT_CONFIG,
        layer_class="DiffusionGemmaEncoderTextLayer",
        experts_class="DiffusionGemmaTextExperts",
        block_path="layers.0",
        model_class="DiffusionGemmaEncoderTextModel",
        modeling_module="transformers.models.diffusion_gemma.modeling_diffusion_gemma",
    ),
)
