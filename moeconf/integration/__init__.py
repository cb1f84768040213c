"""Gate a framework's own MoE integration: hand moeconf your functions, get moeconf's records back.

* ``audit_leaf_function(leaf_fn, archs=...)`` — your ZeRO-3 leaf function marks the MoE block (not a
  sub-module, not the decoder layer), and marks the same paths on every rank.
* ``audit_configure_function(configure_fn, archs=..., coef=...)`` — your MoE config function switches
  the router outputs on and the model's loss is ``CE + coef·aux`` with the coefficient you passed.
* ``audit_lora_experts(arch, ...)`` — LoRA adapters on the expert projections (PEFT ``target_parameters``)
  get gradients for routed experts, exact zeros for idle ones, and merge to the reference's ``W + ΔW``.
* ``tiny_model``, ``default_config``, ``padded_batch``, ``causal_lm_loss`` — the pieces behind them.
* ``AuditResult`` → ``to_check_results`` / ``render``: the text, JSON and JUnit reports of ``moeconf check``.

See docs/integration.md.
"""

from __future__ import annotations

from moeconf.integration.configure import (
    CONFIGURE_CHECKS,
    CallPlan,
    ConfigureFunction,
    audit_configure_function,
    call_plan,
)
from moeconf.integration.environment import as_rank, deepspeed_default_leaves_off, zero3_enabled
from moeconf.integration.leaf import LEAF_CHECKS, LeafFunction, audit_leaf_function, marked_modules
from moeconf.integration.lora import (
    LORA_CHECKS,
    audit_lora_experts,
    expert_factors,
    expert_slices,
    peft_apply_lora,
    peft_merge,
)
from moeconf.integration.models import causal_lm_loss, default_config, moe_blocks, padded_batch, tiny_model
from moeconf.integration.results import AuditResult, IntegrationStatus, render, report_exit_code, to_check_results

__all__ = [
    "CONFIGURE_CHECKS",
    "LEAF_CHECKS",
    "LORA_CHECKS",
    "AuditResult",
    "CallPlan",
    "ConfigureFunction",
    "IntegrationStatus",
    "LeafFunction",
    "as_rank",
    "audit_configure_function",
    "audit_leaf_function",
    "audit_lora_experts",
    "call_plan",
    "causal_lm_loss",
    "deepspeed_default_leaves_off",
    "default_config",
    "expert_factors",
    "expert_slices",
    "marked_modules",
    "moe_blocks",
    "padded_batch",
    "peft_apply_lora",
    "peft_merge",
    "render",
    "report_exit_code",
    "tiny_model",
    "to_check_results",
    "zero3_enabled",
]
