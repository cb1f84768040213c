"""Registry entries: the last two routers of transformers 5.24 that needed new spec vocabulary (data, not
code; see core.py for the shared tiny sizes).

- **phimoe** — SparseMixer (R8, ``weight_from="sparsemixer"``): two picks by repeated argmax of the logits;
  pick ``j`` is weighted by a softmax over the logits within ``2ε`` (relative) of it, earlier picks at −inf
  (``sparsemixer``, ``models/phimoe/modeling_phimoe.py:340-460``).
- **jetmoe** — top-k on logits → softmax over the k (R2), experts as two ``JetMoeParallelExperts`` fed rows
  sorted by expert (no ``experts(x, index, weights)`` call: ``routing_from="router_grouped"``), and a learned
  output bias ``[H]`` (``MoESpec.output_bias``, canonical ``output.bias``).

docs/router-families.md ('SparseMixer (R8)') and docs/transformers-moe-landscape.md ('PhiMoE and JetMoE') give
the formulas, the upstream lines and the upstream findings.
"""

from __future__ import annotations

from moeconf.registry.config_space import FieldRule, Published
from moeconf.registry.core import ATTENTION, FUSED_EXPERTS, SWITCH_AUX, TOPK_THEN_SOFTMAX, E, H, I, K
from moeconf.registry.entry import ArchEntry, Binding, Expectation
from moeconf.spec import MoESpec, RouterSpec

SPARSEMIXER_EPS = 0.2
"""PhiMoE ``router_jitter_noise`` (SparseMixer's ``jitter_eps``) of the tiny config.

NOTE: PhimoeConfig defaults to 0.01: a logit joins a pick's softmax only within 2 % (relative) of the pick, which on
the tiny O(2) logits never happens on the tokens the cases draw, so every weight would be exactly 1 and a
SparseMixer that forgot its mask (or its −inf on the first pick) would still pass. With 2ε = 0.4, 1 to 5 logits
stay in a pick's softmax and 40 % of the weights are below 1 (seed 0, 4096 candidates); the cases keep every
mask decision 0.05 away from its threshold (``Routing.margin``), so bf16 rounding never flips one."""

PHIMOE_CONFIG = dict(
    hidden_size=H,
    intermediate_size=I,
    num_local_experts=E,
    num_experts_per_tok=K,  # must be 2: SparseMixer never reads top_k (modeling_phimoe.py:340)
    num_hidden_layers=1,
    router_jitter_noise=SPARSEMIXER_EPS,
    input_jitter_noise=0.0,
    router_aux_loss_coef=0.02,
    output_router_logits=True,
    **ATTENTION,
)

SPARSEMIXER = RouterSpec(
    scoring="softmax",  # unused by the weights; the aux loss softmaxes the recorded logits itself
    select_on="logits",
    weight_from="sparsemixer",
    sparsemixer_eps=SPARSEMIXER_EPS,
)

PHIMOE_TOP2 = (
    "upstream: sparsemixer(scores, jitter_eps, training, top_k=2) never reads top_k: it always makes exactly two "
    "picks, the argmax and the argmax with the first masked (modeling_phimoe.py:340-440 in transformers 5.24), "
    "although PhimoeTopKRouter passes top_k=config.num_experts_per_tok (:468, :477-478): any "
    "num_experts_per_tok other than 2 is ignored, and k > num_local_experts is accepted in silence"
)
PHIMOE_OTHER_K = tuple(k for k in range(1, 18) if k != 2)
"""Every k a sample can draw (``strategies.MAX_EXPERTS`` + 1 for ``invalid:top_k``) but the 2 the block makes."""

JETMOE_CONFIG = {
    "hidden_size": H,
    "intermediate_size": I,
    "num_local_experts": E,
    "num_experts_per_tok": K,
    "num_hidden_layers": 1,
    # The attention is a mixture too (JetMoeMoA: E query/output projections, k per token); its width is
    # kv_channels × num_key_value_heads, and num_attention_heads is derived (= heads × k).
    "num_key_value_heads": 2,
    "kv_channels": 8,
    "vocab_size": ATTENTION["vocab_size"],
    "max_position_embeddings": ATTENTION["max_position_embeddings"],
    "aux_loss_coef": 0.02,
    "output_router_logits": True,
}

ENTRIES: tuple[ArchEntry, ...] = (
    ArchEntry(
        model_type="phimoe",
        config_class="PhimoeConfig",
        config_kwargs=PHIMOE_CONFIG,
        block_class="PhimoeSparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="PhimoeForCausalLM",
        spec=MoESpec(E, K, H, I, router=SPARSEMIXER, losses=SWITCH_AUX),
        params=(Binding("router.weight", ("router.weight",)),) + FUSED_EXPERTS,
        router_path="router",
        experts_path="experts",
        aux_coef_attr="router_aux_loss_coef",
        # NOTE eval(): in training SparseMixer *samples* each pick (Gumbel-max over the masked logits,
        # modeling_phimoe.py:366-374, :417-427) and multiplies a weight by 1/3 at random (Heun's third-order
        # mask, :383-390, :434-442; the custom PhimoeMultiplier backward, :238-297, replaces autograd). Only
        # eval is deterministic: argmax picks, plain masked-softmax weights and autograd gradients.
        train_mode=False,
        config_fields=(FieldRule("router_jitter_noise", "sparsemixer_eps"),),
        published=(
            Published(
                "microsoft/Phi-3.5-MoE-instruct",
                {"num_local_experts": 16, "num_experts_per_tok": 2, "router_jitter_noise": 0.01},
            ),
        ),
        expectations=(
            Expectation(
                "xfail",
                PHIMOE_TOP2,
                check="config_rejects_invalid",
                config="invalid:top_k",
            ),
        )
        # NOTE skip, not xfail: the router returns [N, 2] picks where the config asks for k, which the harness
        # reads as a malformed observation (an error, never excused by an xfail).
        + tuple(Expectation("skip", PHIMOE_TOP2, when=(("num_experts_per_tok", k),)) for k in PHIMOE_OTHER_K)
        + tuple(
            Expectation(
                "xfail",
                "upstream, 5.0.0: PhimoeTopKRouter scatters the two weights into a dense [N, E] tensor "
                "(5.0.0 modeling_phimoe.py:512) and returns it in place of the logits (recorded as "
                "router_logits: the aux loss is computed from it), and PhimoeExperts reads it by top-k "
                "position, top_k_weights[token_idx, top_k_pos] (:366): each pick is weighted by expert 0's or "
                "1's weight; fixed in 5.1.0 (router returns logits, weights [N, k])",
                check=check,
                releases=">=5.0,<5.1",
                case=case,
                # transformers' grouped_mm / batched_mm experts read the weights by expert, not by position: only
                # the eager experts loop misweights (the aux loss is the router's, on every backend)
                backend=None if check in ("aux_loss", "grad_aux_loss") else "hf-eager",
            )
            for check in ("output", "grad_input", "grad_router", "grad_experts", "aux_loss", "grad_aux_loss")
            # NOTE: with one token the router's gradient happens to agree (measured on 5.0.0): not declared there.
            for case in (("random", "empty_expert", "one_expert") if check == "grad_router" else (None,))
        ),
    ),
    ArchEntry(
        model_type="jetmoe",
        config_class="JetMoeConfig",
        config_kwargs=JETMOE_CONFIG,
        block_class="JetMoeMoE",
        block_path="model.layers.0.mlp",
        model_class="JetMoeForCausalLM",
        # Logits cast to fp32, top-k on them, softmax over the k (cast back), then + bias [H].
        spec=MoESpec(E, K, H, I, router=TOPK_THEN_SOFTMAX, losses=SWITCH_AUX, output_bias=True),
        params=(
            Binding("router.layer.weight", ("router.weight",)),
            # input_linear [E, 2I, H]: chunk(2) gives act(first half) · second half, i.e. gate rows first.
            Binding("input_linear.weight", ("experts.w_gate", "experts.w_up"), "gate_up_rows"),
            Binding("output_linear.weight", ("experts.w_down",)),
            Binding("bias", ("output.bias",)),
        ),
        router_path="router",
        router_logits_index=4,
        # No experts module: input_linear / output_linear sit on the block and take expert-sorted rows; the
        # routing is read from the router's grouped output.
        experts_path="",
        routing_from="router_grouped",
        # JetMoeParallelExperts is not decorated with @use_experts_implementation.
        experts_implementations=("eager",),
        aux_coef_attr="aux_loss_coef",
    ),
)
