"""Step 1 of discover: a tiny config for a model type nobody has registered yet.

The config class's own field names are unknown in advance, so each tiny size is offered under the
names the installed model types use for it; the first name the class declares (directly or through
its ``attribute_map``) gets the value. Sizes come from the registry's tiny sizes, so a discovered
entry has the same shapes as the registered ones (H ≠ I ≠ 2I: a transposed weight cannot pass).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from moeconf.registry.core import ATTENTION, E, H, I, K, S
from moeconf.registry.deepseek_family import GROUPS, MLA, TOKENS

TINY_SCALING = 2.5
"""Routed scaling factor λ of the tiny config: not 1, so that candidates with and without λ differ."""

TINY_AUX_COEF = 0.02
"""Aux-loss coefficient of the tiny config: non-zero, so that a model that adds the loss does."""

DENSE_INTERMEDIATE = 2 * I
"""Width of a dense MLP next to the experts: different from I, so a dense MLP never looks like an expert."""

LAYER_COUNTS = (1, 2, 4)
"""Layers tried, fewest first, when a config or model rejects fewer (layer patterns, hybrid layer types)."""

TOPK_FIELDS = ("num_experts_per_tok", "moe_topk", "moe_k", "moe_top_k", "top_k_experts", "num_experts_per_token")
N_GROUP_FIELDS = ("n_group", "num_expert_group")
TOPK_GROUP_FIELDS = ("topk_group",)
"""Names of the expert-group count and of the number of groups kept (group-limited routing)."""

SIZE_FIELDS: tuple[tuple[tuple[str, ...], Any], ...] = (
    (("hidden_size", "d_model", "n_embd"), H),
    (("num_attention_heads", "n_heads", "n_head"), ATTENTION["num_attention_heads"]),
    (("num_key_value_heads", "num_kv_heads", "kv_n_heads"), ATTENTION["num_key_value_heads"]),
    (("head_dim",), MLA["head_dim"]),
    (("vocab_size",), ATTENTION["vocab_size"]),
    (("max_position_embeddings", "max_seq_len"), ATTENTION["max_position_embeddings"]),
    (("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"), E),
    (TOPK_FIELDS, K),
    (("shared_expert_intermediate_size", "shared_intermediate_size", "moe_shared_expert_intermediate_size"), S),
    (("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),  # one shared MLP of width I
    (N_GROUP_FIELDS, GROUPS.n_group),
    (TOPK_GROUP_FIELDS, GROUPS.topk_group),
    (("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index"), 0),  # layer 0 is the MoE layer
    (("decoder_sparse_step", "moe_layer_interval"), 1),  # every layer is an MoE layer
    (("mlp_only_layers",), []),
    (("q_lora_rank", "kv_lora_rank"), MLA["q_lora_rank"]),
    (("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"), MLA["qk_rope_head_dim"]),
    (("pad_token_id",), TOKENS["pad_token_id"]),  # default pad ids lie outside the tiny vocabulary
    (("router_aux_loss_coef",), TINY_AUX_COEF),
    (("output_router_logits",), True),  # the model records router logits: the aux loss needs them
)
"""(field names, tiny value): the first name of each group that the config declares gets the value
(for the groups in ``ALL_OF_GROUP`` every declared name does)."""

ALL_OF_GROUP = frozenset({"q_lora_rank", "qk_rope_head_dim"})
"""Groups whose names are distinct fields (set every one), not aliases (set the first)."""

EXPERT_INTERMEDIATE_FIELDS = ("moe_intermediate_size", "expert_ffn_hidden_size", "ffn_hidden_size", "d_ff")
LAYER_FIELDS = ("num_hidden_layers", "n_layers", "num_layers")
SCALING_FIELDS = (
    "routed_scaling_factor",
    "router_scaling_factor",
    "moe_routed_scaling_factor",
    "moe_router_scaling_factor",
    "route_scale",
)
"""Names of the routed scaling factor λ."""

SUB_CONFIG_DEPTH = 2
"""Sub-configs are followed two deep (Qwen3-Omni's ``thinker_config.text_config``)."""


def config_fields(config_cls: type) -> set[str]:
    """Declared field names of a config class (a dataclass, or annotations for older configs)."""
    if dataclasses.is_dataclass(config_cls):
        return {f.name for f in dataclasses.fields(config_cls)}
    return {n for klass in config_cls.__mro__ for n in getattr(klass, "__annotations__", {})}


def _resolve(config_cls: type, name: str, fields: set[str]) -> str | None:
    """The field ``name`` sets: its ``attribute_map`` target first (an alias may also be declared as a
    field of its own that the model never reads: Step3p7's ``num_local_experts``), else ``name``."""
    target = (getattr(config_cls, "attribute_map", None) or {}).get(name)
    if target in fields:
        return target
    return name if name in fields else None


def _first_declared(config_cls: type, names: Iterable[str], fields: set[str]) -> str | None:
    return next((r for r in (_resolve(config_cls, n, fields) for n in names) if r), None)


def _has_experts(config_cls: type) -> bool:
    return any("expert" in f for f in config_fields(config_cls))


def _size_kwargs(config_cls: type, fields: set[str]) -> dict[str, Any]:
    """``SIZE_FIELDS`` under the names ``config_cls`` declares."""
    kwargs: dict[str, Any] = {}
    for names, value in SIZE_FIELDS:
        resolved = [r for r in (_resolve(config_cls, n, fields) for n in names) if r]
        for target in resolved if names[0] in ALL_OF_GROUP else resolved[:1]:
            kwargs[target] = value
    return kwargs


def _intermediate_kwargs(config_cls: type, fields: set[str]) -> dict[str, int]:
    """The expert width I, and a different dense width where the config has both."""
    expert = _first_declared(config_cls, EXPERT_INTERMEDIATE_FIELDS, fields)
    dense = _resolve(config_cls, "intermediate_size", fields)
    if expert is None:
        return {dense: I} if dense else {}
    return {expert: I} | ({dense: DENSE_INTERMEDIATE} if dense and dense != expert else {})


def shrink_kwargs(config_cls: type, layers: int, depth: int = 0) -> dict[str, Any]:
    """Generic tiny-size keyword arguments for ``config_cls`` (and its MoE sub-configs, nested)."""
    fields = config_fields(config_cls)
    kwargs = _size_kwargs(config_cls, fields) | _intermediate_kwargs(config_cls, fields)
    if layer := _first_declared(config_cls, LAYER_FIELDS, fields):
        kwargs[layer] = layers
    if scaling := _first_declared(config_cls, SCALING_FIELDS, fields):
        kwargs[scaling] = TINY_SCALING
    for name in fields:
        if "jitter" in name:
            kwargs[name] = 0.0  # training noise would make the block non-deterministic
    if depth < SUB_CONFIG_DEPTH:
        for key, sub in (getattr(config_cls, "sub_configs", None) or {}).items():
            if isinstance(sub, type) and (_has_experts(sub) or key == "text_config"):
                kwargs[key] = shrink_kwargs(sub, layers, depth + 1)
    return kwargs


def drop_key(kwargs: dict[str, Any], key: str) -> bool:
    """Remove ``key`` wherever it occurs in the nested kwargs; True if something was removed."""
    removed = kwargs.pop(key, None) is not None
    for value in kwargs.values():
        if isinstance(value, dict):
            removed = drop_key(value, key) or removed
    return removed


def nested_keys(kwargs: Mapping[str, Any]) -> list[str]:
    """Every key of the nested kwargs: plain values' keys before sub-configs' (a retry drops the first
    key an error names: better one size than a whole sub-config), each in order (a set's order varies
    with string hashing from run to run, and so would the key dropped)."""
    plain = [k for k, v in kwargs.items() if not isinstance(v, Mapping)]
    subs = [k for k, v in kwargs.items() if isinstance(v, Mapping)]
    inner = [key for sub in subs for key in nested_keys(kwargs[sub])]
    return list(dict.fromkeys(plain + inner + subs))


def config_int(config: Any, names: Iterable[str]) -> int | None:
    """The first of ``names`` that ``config`` holds as an int (not a bool)."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def config_value(config: Any, names: Iterable[str]) -> Any:
    """The first of ``names`` that ``config`` holds as something other than None."""
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)
