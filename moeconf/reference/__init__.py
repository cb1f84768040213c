"""The reference MoE: float64, plain torch, never transformers. It *defines* the expected routing,
output, losses and (through autograd) gradients for every spec."""

from moeconf.reference.dispatch import Dispatch, grouped_matmul, make_dispatch, permute, unpermute
from moeconf.reference.losses import aux_selection_margin, load_balancing_loss, router_z_loss
from moeconf.reference.moe import (
    ReferenceResult,
    expert_mlp,
    reference_forward,
    reference_gradients,
    reference_loss_gradients,
)
from moeconf.reference.router import Routing, route, router_logits

__all__ = [
    "Dispatch",
    "ReferenceResult",
    "Routing",
    "aux_selection_margin",
    "expert_mlp",
    "grouped_matmul",
    "load_balancing_loss",
    "make_dispatch",
    "permute",
    "reference_forward",
    "reference_gradients",
    "reference_loss_gradients",
    "route",
    "router_logits",
    "router_z_loss",
    "unpermute",
]
