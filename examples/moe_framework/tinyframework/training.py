"""What the framework does to a model before training: ZeRO-3 leaves and the MoE config."""

from __future__ import annotations

from typing import Any

from torch import nn

MOE_BLOCKS = ("TinyMoeBlock", "MixtralSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "OlmoeSparseMoeBlock")
"""The MoE block classes the framework trains, by name (so remote-code copies count too)."""


def set_zero3_leaves(model: nn.Module) -> None:
    """Make every MoE block a ZeRO-3 leaf: its parameters are gathered once for the whole block.

    Without it, ranks whose tokens routed to different experts fetch different parameters and hang.
    """
    from deepspeed.utils import set_z3_leaf_modules

    classes = {type(m) for m in model.modules() if type(m).__name__ in MOE_BLOCKS}
    if classes:
        set_z3_leaf_modules(model, sorted(classes, key=lambda c: c.__name__))


def configure_moe(config: Any, model_args: Any) -> None:
    """Switch the router outputs on (without them the model adds no aux loss) and set the aux-loss
    coefficient the user asked for, on the attribute the model actually reads."""
    config.output_router_logits = True
    config.router_aux_loss_coef = model_args.moe_aux_loss_coef
