"""A framework's MoE integration, written the way training frameworks write it (a model-type table and
``deepspeed.utils.set_z3_leaf_modules``; a ``configure_moe(config, model_args, is_trainable)``), once
correct and with the bugs such code really has. Each bug must turn exactly its integration check red
(tests/test_integration_api.py).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

# What a framework keeps per model type: the MoE block, and (for the bugs) its neighbours.
BLOCKS = {"mixtral": "MixtralSparseMoeBlock", "qwen3_moe": "Qwen3MoeSparseMoeBlock", "deepseek_v3": "DeepseekV3MoE"}
EXPERTS = {"mixtral": "MixtralExperts", "qwen3_moe": "Qwen3MoeExperts", "deepseek_v3": "DeepseekV3Experts"}
LAYERS = {
    "mixtral": "MixtralDecoderLayer",
    "qwen3_moe": "Qwen3MoeDecoderLayer",
    "deepseek_v3": "DeepseekV3DecoderLayer",
}
# A block name off by one letter's case, as typed by hand (the class is never found).
TYPOS = {"mixtral": "MixtralSparseMoEBlock", "qwen3_moe": "Qwen3MoESparseMoeBlock", "deepseek_v3": "DeepSeekV3MoE"}
AUX_MODEL_TYPES = ("mixtral", "qwen3_moe", "olmoe")
COMPOSITE_AUX_TEXT_TYPES = ("glm4v_moe_text",)


def _mark(model: nn.Module, table: dict[str, str]) -> None:
    from deepspeed.utils import set_z3_leaf_modules

    name = table.get(getattr(getattr(model, "config", None), "model_type", ""))
    if name is not None:
        # NOTE: not raising when absent is how frameworks share one table across model variants;
        # it is also what turns a typo into "marks nothing" instead of an error.
        set_z3_leaf_modules(model, [name], raise_if_not_found=False)


def leaf_correct(model: nn.Module) -> None:
    """Marks the MoE block by class name (remote-code copies included)."""
    _mark(model, BLOCKS)


def leaf_wrong_class_name(model: nn.Module) -> None:
    """Bug: a misspelt class name; nothing is marked and ZeRO-3 hangs on uneven routing."""
    _mark(model, TYPOS)


def leaf_marks_experts(model: nn.Module) -> None:
    """Bug: marks the experts sub-module, "where the uneven work is", instead of the block."""
    _mark(model, EXPERTS)


def leaf_marks_decoder_layer(model: nn.Module) -> None:
    """Bug: marks the whole decoder layer, so attention is never partitioned either."""
    _mark(model, LAYERS)


def leaf_on_main_process_only(model: nn.Module) -> None:
    """Bug: leaf setup placed inside the framework's main-process-only block; other ranks mark nothing."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        _mark(model, BLOCKS)


def leaf_relies_on_deepspeed_defaults(model: nn.Module) -> None:
    """Bug: marks nothing of its own and trusts DeepSpeed's default leaf list (which covers only
    Mixtral, Qwen2-MoE and Qwen3-MoE, and is gone once a user configures ``leaf_module``)."""
    from deepspeed.runtime.zero.leaf_module_config import DeepSpeedZeroLeafModuleConfig
    from deepspeed.utils.z3_leaf_module import apply_zero_leaf_module_config

    apply_zero_leaf_module_config(model, DeepSpeedZeroLeafModuleConfig())


def leaf_guarded_like_llamafactory(model: nn.Module) -> None:
    """Correct, and returns early unless transformers reports ZeRO-3 (as LLaMA-Factory's does)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        _mark(model, BLOCKS)


def _text_config(config: Any) -> Any:
    text = getattr(config, "text_config", None)
    return text if getattr(text, "model_type", None) in COMPOSITE_AUX_TEXT_TYPES else None


def configure_correct(config: Any, model_args: Any, is_trainable: bool) -> None:
    """Router outputs on and the coefficient where each model reads it (the text config of a VLM)."""
    if not is_trainable or not model_args.moe_aux_loss_coef:
        return
    target = config if config.model_type in AUX_MODEL_TYPES else _text_config(config)
    if target is not None:
        target.output_router_logits = True
        target.router_aux_loss_coef = model_args.moe_aux_loss_coef


def configure_ignores_coef(config: Any, model_args: Any, is_trainable: bool) -> None:
    """Bug: writes the coefficient under another model family's name (``aux_loss_coef``): the model
    keeps its default ``router_aux_loss_coef``."""
    target = config if config.model_type in AUX_MODEL_TYPES else _text_config(config)
    if is_trainable and target is not None:
        target.output_router_logits = True
        target.aux_loss_coef = model_args.moe_aux_loss_coef


def configure_forgets_router_logits(config: Any, model_args: Any, is_trainable: bool) -> None:
    """Bug: sets the coefficient but never switches ``output_router_logits`` on: no aux loss at all."""
    target = config if config.model_type in AUX_MODEL_TYPES else _text_config(config)
    if is_trainable and target is not None:
        target.router_aux_loss_coef = model_args.moe_aux_loss_coef


def configure_everything_everywhere(config: Any, model_args: Any, is_trainable: bool) -> None:
    """Sets the flag and a coefficient on every config, also on models without an aux loss (DeepSeek-V3
    in transformers): harmless to the loss, but the knobs do nothing there (a warning)."""
    config.output_router_logits = True
    config.router_aux_loss_coef = model_args.moe_aux_loss_coef
