"""What tinyframework hands to moeconf (``pyproject.toml`` also installs both as entry points).

- ``GROUPED``: transformers MoE blocks with their experts forward patched to the framework's grouped
  path, the way the framework runs them in training; ``GROUPED_WRONG_WEIGHTS``: the same with a
  planted bug (routing weights not permuted with their rows), to see what red looks like.
- ``ARCHITECTURES``: the framework's own block, ``TinyMoeBlock``, as a moeconf registry entry.
"""

from __future__ import annotations

import torch

from moeconf.backends.fused_experts import FusedExpertsBackend
from moeconf.registry import ArchEntry, Binding
from moeconf.spec import LossSpec, MoESpec, RouterSpec
from tinyframework.kernels import grouped_experts


class GroupedExpertsBackend(FusedExpertsBackend):
    """The block as shipped (router, shared experts, parameter layout); experts on the grouped path."""

    def __init__(self, name: str, permute_weights: bool = True) -> None:
        super().__init__(name)
        self.permute_weights = permute_weights

    def experts_forward(
        self,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        return grouped_experts(
            gate_up_proj, down_proj, hidden, top_k_index, top_k_weights, permute_weights=self.permute_weights
        )


GROUPED = GroupedExpertsBackend("tinyframework-grouped")
GROUPED_WRONG_WEIGHTS = GroupedExpertsBackend("tinyframework-grouped-wrong-weights", permute_weights=False)

E, K, H, I = 8, 2, 32, 24  # tiny, with H != I != 2I: a transposed weight cannot pass by its shape

TINY_MOE = ArchEntry(
    model_type="tinyframework_moe",
    config_class="MixtralConfig",  # the framework's block reads a Mixtral config
    config_kwargs={
        "hidden_size": H,
        "intermediate_size": I,
        "num_local_experts": E,
        "num_experts_per_tok": K,
        "num_hidden_layers": 1,
        "router_aux_loss_coef": 0.02,
        "output_router_logits": True,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 128,
    },
    modeling_module="tinyframework.modeling",
    block_class="TinyMoeBlock",
    block_path="model.layers.0.mlp",
    model_class="MixtralForCausalLM",
    spec=MoESpec(E, K, H, I, router=RouterSpec(scoring="softmax", renorm="always"), losses=LossSpec(aux="switch")),
    params=(
        Binding("gate.weight", ("router.weight",)),
        Binding("experts.gate_up_proj", ("experts.w_gate", "experts.w_up"), "gate_up_rows"),
        Binding("experts.down_proj", ("experts.w_down",)),
    ),
    router_path="gate",
    experts_path="experts",
    leaf_classes=("TinyMoeBlock",),
    aux_coef_attr="router_aux_loss_coef",
    experts_implementations=("eager",),  # no transformers experts implementations to switch to
)
ARCHITECTURES = (TINY_MOE,)
