"""Registry entries: sigmoid family (data, not code; see core.py for the shared tiny sizes and helpers)."""

from __future__ import annotations

from moeconf.registry.core import ATTENTION, FUSED_EXPERTS, SWITCH_AUX, E, H, I, K, S, shared_mlp
from moeconf.registry.entry import ArchEntry, Binding
from moeconf.spec import ExpertSpec, MoESpec, RouterSpec, SharedSpec


def sigmoid_router(**options: object) -> RouterSpec:
    """R4: sigmoid scores on all experts → top-k (of scores + selection bias) → gathered scores → renormalise."""
    base: dict[str, object] = dict(scoring="sigmoid", select_on="scores", selection_bias=True, weight_from="scores", renorm="always")
    return RouterSpec(**{**base, **options})  # type: ignore[arg-type]


ROUTER = (Binding("gate.weight", ("router.weight",)),)
GATE_BIAS = (Binding("gate.e_score_correction_bias", ("router.selection_bias",)),)

ENTRIES: tuple[ArchEntry, ...] = (
    ArchEntry(
        model_type="minimax_m2",
        config_class="MiniMaxM2Config",
        config_kwargs=dict(
            hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K, num_hidden_layers=1,
            head_dim=8, router_jitter_noise=0.0, router_aux_loss_coef=0.02, output_router_logits=True, **ATTENTION,
        ),
        modeling_module="transformers.models.minimax_m2.modeling_minimax_m2",
        block_class="MiniMaxM2SparseMoeBlock",
        block_path="model.layers.0.mlp",
        model_class="MiniMaxM2ForCausalLM",
        # Sigmoid + selection bias (a buffer on the *block*, passed to the router), renorm without eps.
        spec=MoESpec(E, K, H, I, router=sigmoid_router(), losses=SWITCH_AUX),
        params=ROUTER + (Binding("e_score_correction_bias", ("router.selection_bias",)),) + FUSED_EXPERTS,
        router_path="gate",
        experts_path="experts",
        aux_coef_attr="router_aux_loss_coef",
    ),
)
