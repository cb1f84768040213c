"""``moeconf discover MODEL_TYPE``: propose a registry entry for a model type by experiment.

Steps (each a small function below):

1. **Tiny config** — the model type's config class with sizes shrunk generically (hidden 32, expert
   intermediate 24, 8 experts, top-2, 1-2 layers, 4 heads, vocab 128), attribute names tried from the
   landscape notes' §5 "E / k / I" column and resolved through the config's ``attribute_map``;
   retried with more layers or without an offending keyword when construction fails.
2. **Locate the block** — the tiny model is built on the ``meta`` device (no memory) and the MoE block
   is the first module with an experts child (3-D weights or an ``*Experts`` class) and a router child.
3. **Read the block** — the real block is built from the (sub-)config whose parameter shapes match;
   bindings are inferred from parameter names and shapes (router weight/bias, selection bias,
   fused/separate/flat expert weights, shared MLP and its gate, output norm); one hooked forward tells
   where the router logits are and whether the experts receive ``(x, index, weights)``.
4. **Try candidates** — router families (§4 R1-R6, incl. selection bias, group limits and routed
   scaling read from the config) × expert forms (rows/transposed/interleaved, gated or not, biases,
   activation, clamps) × shared forms. Canonical parameters are drawn (``draw_params``), loaded through
   ``load_params``, and the block is run once per distinct parameter set on a pool of tokens; each
   candidate is compared with ``reference_forward`` on the tokens it routes with a margin.
5. **Propose** — the best candidate under the fp32 tolerances, as an ``ArchEntry`` and as Python source.
   Candidates that agree numerically (softmax→top-k→renorm ≡ top-k on logits→softmax) are told apart
   by what the router's source code applies ``topk`` to.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import inspect
import json
import math
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moeconf.harness.cases import MIN_MARGIN, draw_params
from moeconf.harness.checks import TOLERANCES, compare
from moeconf.hf.block import EntryError, block_config, build_block, build_config, load_params, recording
from moeconf.params import Params, round_through
from moeconf.reference import reference_forward, route
from moeconf.registry.entry import ArchEntry, Binding
from moeconf.registry.layouts import LAYOUTS
from moeconf.spec import ExpertSpec, GroupLimit, LossSpec, MoESpec, RouterSpec, SharedSpec

EXIT_OK, EXIT_NO_MATCH, EXIT_USAGE = 0, 1, 2

# --- 1. tiny config -------------------------------------------------------------------------------

SIZE_FIELDS: tuple[tuple[tuple[str, ...], Any], ...] = (
    (("hidden_size", "d_model", "n_embd"), 32),
    (("num_attention_heads", "n_heads", "n_head"), 4),
    (("num_key_value_heads", "num_kv_heads", "kv_n_heads"), 4),
    (("head_dim",), 8),
    (("vocab_size",), 128),
    (("max_position_embeddings", "max_seq_len"), 64),
    (("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"), 8),
    (("num_experts_per_tok", "moe_topk", "moe_k", "moe_top_k", "top_k_experts", "num_experts_per_token"), 2),
    (("shared_expert_intermediate_size", "shared_intermediate_size", "moe_shared_expert_intermediate_size"), 16),
    (("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),
    (("n_group", "num_expert_group"), 2),
    (("topk_group",), 1),
    (("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index"), 0),
    (("decoder_sparse_step", "moe_layer_interval"), 1),
    (("mlp_only_layers",), []),
    (("q_lora_rank", "kv_lora_rank"), 16),
    (("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"), 8),
    (("pad_token_id",), 0),  # default pad ids lie outside the tiny vocabulary
    (("router_aux_loss_coef",), 0.02),
    (("output_router_logits",), True),
)
"""(field names, tiny value): the first name of each group that the config declares gets the value
(groups of equivalent names — ``q_lora_rank``/``kv_lora_rank`` — are all set)."""

ALL_OF_GROUP = frozenset({"q_lora_rank", "qk_rope_head_dim"})
"""Groups whose names are distinct fields (set every one), not aliases (set the first)."""

EXPERT_INTERMEDIATE = ("moe_intermediate_size", "expert_ffn_hidden_size", "ffn_hidden_size", "d_ff")
LAYER_FIELDS = ("num_hidden_layers", "n_layers", "num_layers")
SCALING_FIELDS = (
    "routed_scaling_factor",
    "router_scaling_factor",
    "moe_routed_scaling_factor",
    "moe_router_scaling_factor",
    "route_scale",
)
"""Routed scaling factor λ; set to a non-trivial value so that candidates with and without it differ."""
TINY_SCALING = 2.5
TOPK_FIELDS = SIZE_FIELDS[7][0]
GROUP_FIELDS = (("n_group", "num_expert_group"), ("topk_group",))
ACT_FIELDS = ("hidden_act", "mlp_hidden_act", "hidden_activation", "activation_function")


def config_fields(config_cls: type) -> set[str]:
    """Declared field names of a (dataclass) config class."""
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


def _has_experts(config_cls: type) -> bool:
    return any("expert" in f for f in config_fields(config_cls))


def shrink_kwargs(config_cls: type, layers: int, depth: int = 0) -> dict[str, Any]:
    """Generic tiny-size keyword arguments for ``config_cls`` (and its MoE sub-configs, nested)."""
    fields = config_fields(config_cls)
    kwargs: dict[str, Any] = {}
    for names, value in SIZE_FIELDS:
        resolved = [r for r in (_resolve(config_cls, n, fields) for n in names) if r]
        for target in resolved if names[0] in ALL_OF_GROUP else resolved[:1]:
            kwargs[target] = value
    expert_i = next((r for r in (_resolve(config_cls, n, fields) for n in EXPERT_INTERMEDIATE) if r), None)
    dense_i = _resolve(config_cls, "intermediate_size", fields)
    if expert_i:
        kwargs[expert_i] = 24
        if dense_i and dense_i != expert_i:
            kwargs[dense_i] = 48
    elif dense_i:
        kwargs[dense_i] = 24
    if layer := next((r for r in (_resolve(config_cls, n, fields) for n in LAYER_FIELDS) if r), None):
        kwargs[layer] = layers
    if scaling := next((r for r in (_resolve(config_cls, n, fields) for n in SCALING_FIELDS) if r), None):
        kwargs[scaling] = TINY_SCALING
    for name in fields:
        if "jitter" in name:
            kwargs[name] = 0.0  # training noise would make the block non-deterministic
    if depth < 2:
        for key, sub in (getattr(config_cls, "sub_configs", None) or {}).items():
            if isinstance(sub, type) and (_has_experts(sub) or key == "text_config"):
                kwargs[key] = shrink_kwargs(sub, layers, depth + 1)
    return kwargs


def _drop_key(kwargs: dict[str, Any], key: str) -> bool:
    """Remove ``key`` wherever it occurs in the nested kwargs; True if something was removed."""
    removed = kwargs.pop(key, None) is not None
    for value in kwargs.values():
        if isinstance(value, dict):
            removed = _drop_key(value, key) or removed
    return removed


def _keys(kwargs: Mapping[str, Any]) -> set[str]:
    out = set(kwargs)
    for value in kwargs.values():
        if isinstance(value, Mapping):
            out |= _keys(value)
    return out


# --- 2. locate the block ----------------------------------------------------------------------------

ROUTER_NAME = re.compile(r"router|gate|gating", re.IGNORECASE)
SHARED_NAME = re.compile(r"shared", re.IGNORECASE)


def _is_experts(name: str, module: nn.Module) -> bool:
    cls = type(module).__name__
    if SHARED_NAME.search(name):  # the attribute name only: class names carry the model's ("GraniteMoeShared...")
        return False
    if "Expert" in cls:
        return True
    # Unnamed experts containers: 3-D projection weights (not a Conv1d's [C, 1, K]).
    return any(p.dim() == 3 and re.search(r"proj|linear", n) for n, p in module.named_parameters(recurse=False))


def _is_router(name: str, module: nn.Module) -> bool:
    if SHARED_NAME.search(name) or "norm" in type(module).__name__.lower():
        return False
    named = ROUTER_NAME.search(name) or ROUTER_NAME.search(type(module).__name__)
    return bool(named) and any(p.dim() == 2 for p in module.parameters())


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with an experts child and a router child, outside attention, in model order."""
    blocks = []
    for path, module in model.named_modules():
        children = list(module.named_children())
        has_parts = any(_is_experts(n, c) for n, c in children) and any(_is_router(n, c) for n, c in children)
        if has_parts and not re.search(r"attn|attention", path, re.IGNORECASE):
            blocks.append((path, module))
    return blocks


def _model_class_names(model_type: str) -> list[str]:
    """Candidate model classes for a type: causal LM first (the audits need ``labels``), then others."""
    from transformers.models.auto import modeling_auto as auto

    names: list[str] = []
    for mapping in (
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
        "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
        "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
        "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
        "MODEL_MAPPING_NAMES",
    ):
        value = getattr(auto, mapping, {}).get(model_type)
        for name in value if isinstance(value, tuple) else (value,):
            if name and name not in names:
                names.append(name)
    return names


def _models_of_config(model_type: str, config_cls: type) -> list[str]:
    """Exported model classes built from ``config_cls`` (types with no auto model class, e.g.
    ``qwen3_omni_moe_text``), causal LMs first."""
    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    folder = model_type_to_module_name(model_type)
    try:
        module = importlib.import_module(f"transformers.models.{folder}.modeling_{folder}")
    except ImportError:
        return []
    names = [
        name
        for name, obj in vars(module).items()
        if isinstance(obj, type)
        and getattr(obj, "config_class", None) is config_cls
        and "PreTrained" not in name
        and getattr(transformers, name, None) is obj
    ]
    return sorted(names, key=lambda n: (not n.endswith("ForCausalLM"), not n.endswith("Model"), n))


MAX_BLOCK_NUMEL = 5_000_000
"""The real block is only built when its meta twin is this small (tiny configs give ~20k parameters)."""


@dataclass(frozen=True)
class Site:
    """Where the MoE block lives and how it is built (the entry's non-spec fields)."""

    config_class: str
    config_kwargs: dict[str, Any]
    model_class: str
    block_path: str
    block_class: str
    modeling_module: str
    block_config_attr: str | None
    block_init: str


def locate(model_type: str, config_kwargs: Mapping[str, Any] | None = None) -> tuple[Site, list[str]]:
    """Build a tiny config and a meta-device model; find the first MoE block. Returns the site and a
    log of the attempts (for the explanation when nothing works)."""
    import transformers
    from transformers import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[model_type]
    attempts: list[dict[str, Any]] = (
        [dict(config_kwargs)] if config_kwargs is not None else [shrink_kwargs(config_cls, n) for n in (1, 2, 4)]
    )
    log: list[str] = []
    for kwargs in attempts:
        for _retry in range(6):
            try:
                config = config_cls(**kwargs)
            except Exception as exc:  # drop a keyword the error names, then retry
                log.append(f"config {config_cls.__name__}: {type(exc).__name__}: {_short(exc)}")
                offending = [k for k in _keys(kwargs) if re.search(rf"\b{re.escape(k)}\b", str(exc))]
                if config_kwargs is None and offending and _drop_key(kwargs, offending[0]):
                    continue
                break
            site = _site_in_model(model_type, config_cls, config, kwargs, log, transformers)
            if site is not None:
                return site, log
            break
    raise EntryError(f"{model_type}: no MoE block found in a tiny model; attempts: " + " | ".join(log[-6:]))


def _site_in_model(
    model_type: str, config_cls: type, config: Any, kwargs: dict[str, Any], log: list[str], transformers: Any
) -> Site | None:
    for model_name in _model_class_names(model_type) + _models_of_config(model_type, config_cls):
        model_cls = getattr(transformers, model_name, None)
        if model_cls is None:
            continue
        try:
            with torch.device("meta"):
                model = model_cls(config)
        except Exception as exc:
            log.append(f"model {model_name}: {type(exc).__name__}: {_short(exc)}")
            continue
        blocks = find_blocks(model)
        if not blocks:
            log.append(f"model {model_name}: no module with experts and router children")
            continue
        path, block = blocks[0]
        numel = sum(p.numel() for p in block.parameters())
        if numel > MAX_BLOCK_NUMEL:  # a size field the shrink missed: never allocate it for real
            log.append(f"model {model_name}: {type(block).__name__} would have {numel:,} parameters (not tiny)")
            continue
        shapes = {n: tuple(p.shape) for n, p in block.named_parameters()}
        sub = _block_config(type(block), config, shapes)
        if sub is None:
            log.append(f"model {model_name}: {type(block).__name__} could not be rebuilt from the config")
            continue
        attr, init = sub
        return Site(
            config_class=config_cls.__name__,
            config_kwargs=kwargs,
            model_class=model_name,
            block_path=path,
            block_class=type(block).__name__,
            modeling_module=type(block).__module__,
            block_config_attr=attr,
            block_init=init,
        )
    return None


def _sub_configs(config: Any, prefix: str | None = None, depth: int = 0) -> list[tuple[str | None, Any]]:
    """``(dotted path, config)`` of the config and its sub-configs, nested two deep (Qwen3-Omni's
    ``thinker_config.text_config``); the path is None for the config itself."""
    out: list[tuple[str | None, Any]] = [(prefix, config)]
    if depth < 2:
        for key in getattr(type(config), "sub_configs", None) or {}:
            sub = getattr(config, key, None)
            if sub is not None and not isinstance(sub, dict):
                out += _sub_configs(sub, f"{prefix}.{key}" if prefix else key, depth + 1)
    return out


def _block_config(block_cls: type, config: Any, shapes: dict[str, tuple[int, ...]]) -> tuple[str | None, str] | None:
    """Which (sub-)config builds the block with the model's parameter shapes, and its constructor form."""
    needs_layer = "layer_idx" in inspect.signature(block_cls).parameters
    init = "config_and_layer_idx" if needs_layer else "config"
    for attr, sub in _sub_configs(config):
        if sub is None or isinstance(sub, dict):
            continue
        try:
            with torch.device("meta"):
                block = block_cls(sub, layer_idx=0) if needs_layer else block_cls(sub)
        except Exception:  # noqa: S112 — this (sub-)config does not build the block: try the next
            continue
        if {n: tuple(p.shape) for n, p in block.named_parameters()} == shapes:
            return attr, init
    return None


def _short(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:limit]


# --- 3. read the block --------------------------------------------------------------------------------


def _probe_entry(site: Site, spec: MoESpec | None = None, params: tuple[Binding, ...] = (), **kw: Any) -> ArchEntry:
    """An ``ArchEntry`` for ``site`` (a dummy spec until the real one is known)."""
    return ArchEntry(
        model_type=kw.pop("model_type", "discovered"),
        config_class=site.config_class,
        config_kwargs=site.config_kwargs,
        modeling_module=site.modeling_module,
        block_class=site.block_class,
        block_path=site.block_path,
        model_class=site.model_class,
        spec=spec or MoESpec(2, 1, 2, 2),
        params=params,
        router_path=kw.pop("router_path", ""),
        experts_path=kw.pop("experts_path", ""),
        block_init=site.block_init,  # type: ignore[arg-type]
        block_config_attr=site.block_config_attr,
        **kw,
    )


@dataclass(frozen=True)
class MlpHints:
    """What an MLP module and its config say about its form (None: not found)."""

    activation: str | None
    limit: float | None
    alpha: float | None
    softcaps: tuple[float, float] | None


@dataclass(frozen=True)
class BlockFacts:
    """What the block's structure and one hooked forward tell.

    Shapes: router weight ``[R, H]``; experts ``E`` (= R: identity experts are not inferred).
    """

    router_path: str
    experts_path: str
    router_weight: str
    router_bias: str | None
    selection_bias: tuple[str, str] | None  # (path, layout)
    hidden: int
    num_experts: int
    top_k: int
    router_logits_index: int | None
    routing_from: str
    decorated: bool
    mlp: MlpHints
    source: str
    experts_source: str


ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "relu2": "relu2",
}
ACT_CLASSES = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELUActivation": "gelu",
    "GELU": "gelu",
    "PytorchGELUTanh": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "ReLU": "relu",
    "ReLUSquaredActivation": "relu2",
}


def _activation_of(module: nn.Module | None, config: Any) -> str | None:
    """Spec activation from a module's ``act_fn`` class, else from the config's activation field."""
    act = getattr(module, "act_fn", None) if module is not None else None
    if act is not None and type(act).__name__ in ACT_CLASSES:
        return ACT_CLASSES[type(act).__name__]
    for name in ACT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, str) and value in ACTIVATIONS:
            return ACTIVATIONS[value]
    return None


def _child_path(block: nn.Module, predicate: Any) -> str | None:
    return next((n for n, c in block.named_children() if predicate(n, c)), None)


def read_block(site: Site) -> tuple[nn.Module, BlockFacts, Any]:
    """Build the real block and read its structure; one forward tells the router output layout."""
    probe = _probe_entry(site)
    block = build_block(probe, "eager")
    config = block_config(probe, build_config(probe))
    router_path = _child_path(block, _is_router)
    experts_path = _child_path(block, _is_experts)
    if router_path is None or experts_path is None:
        raise EntryError(f"{site.block_class}: no router/experts child")
    router = block.get_submodule(router_path)
    router_2d = [(f"{router_path}.{n}", p) for n, p in router.named_parameters() if p.dim() == 2 and "bias" not in n]
    if len(router_2d) != 1:
        raise EntryError(f"{site.block_class}: router {router_path} has {len(router_2d)} 2-D weights (expected 1)")
    router_weight, weight = router_2d[0]
    rows, hidden = weight.shape
    router_bias = next(
        (
            f"{router_path}.{n}"
            for n, p in router.named_parameters()
            if p.dim() == 1 and p.requires_grad and p.shape[0] == rows
        ),
        None,
    )
    selection_bias = _selection_bias(block, rows, router_bias)
    experts = block.get_submodule(experts_path)
    top_k = _config_int(config, TOPK_FIELDS) or 1

    index, logits_index, routing_from = _observe_router(
        block, probe, router_path, experts_path, weight, router_bias, hidden
    )
    if index is not None:
        top_k = index.shape[-1]
    facts = BlockFacts(
        router_path=router_path,
        experts_path=experts_path,
        router_weight=router_weight,
        router_bias=router_bias,
        selection_bias=selection_bias,
        hidden=hidden,
        num_experts=rows,
        top_k=top_k,
        router_logits_index=logits_index,
        routing_from=routing_from,
        decorated=hasattr(experts, "is_concatenated"),
        mlp=mlp_hints(experts, config),
        source=_source(type(router)) + "\n" + _source(type(block)),
        experts_source=_source(type(experts)),
    )
    return block, facts, config


def _source(cls: type) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


def _config_int(config: Any, names: Iterable[str]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _selection_bias(block: nn.Module, rows: int, router_bias: str | None) -> tuple[str, str] | None:
    """A selection-only bias: a buffer or frozen parameter of shape ``[E]`` (or ``[1, E]``) named ``*bias*``."""
    tensors = [(n, t, False) for n, t in block.named_buffers()]
    tensors += [(n, p, p.requires_grad) for n, p in block.named_parameters()]
    for name, tensor, trainable in tensors:
        if name == router_bias or trainable or "bias" not in name.rsplit(".", 1)[-1]:
            continue
        if tuple(tensor.shape) == (rows,):
            return name, "identity"
        if tuple(tensor.shape) == (1, rows):
            return name, "flat_experts"  # [E] → [1, E] (ERNIE's moe_statics)
    return None


def _observe_router(
    block: nn.Module,
    probe: ArchEntry,
    router_path: str,
    experts_path: str,
    weight: torch.Tensor,
    router_bias: str | None,
    hidden: int,
) -> tuple[torch.Tensor | None, int | None, str]:
    """One forward with hooks: which router output is ``x Wᵀ (+b)``, and what the experts receive."""
    entry = dataclasses.replace(probe, router_path=router_path, experts_path=experts_path)
    x = torch.randn(1, 4, hidden, generator=torch.Generator().manual_seed(0))
    seen: dict[str, Any] = {}

    def on_router(_m: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        seen["router_in"], seen["router_out"] = (args[0] if args else None), output

    handle = block.get_submodule(router_path).register_forward_hook(on_router)
    try:
        with torch.no_grad(), recording(entry, block) as rec:
            block.train()(x)
    finally:
        handle.remove()
    out, router_in = seen.get("router_out"), seen.get("router_in")
    logits_index: int | None = 0
    if isinstance(router_in, torch.Tensor):
        bias = block.get_parameter(router_bias) if router_bias else None
        expected = torch.nn.functional.linear(
            router_in.reshape(-1, hidden).float(), weight.float(), None if bias is None else bias.float()
        )
        outputs = [out] if isinstance(out, torch.Tensor) else list(out) if isinstance(out, tuple) else []
        matches = [
            i
            for i, o in enumerate(outputs)
            if isinstance(o, torch.Tensor)
            and o.shape[-1] == expected.shape[-1]
            and torch.allclose(o.reshape(expected.shape).float(), expected, atol=1e-5, rtol=1e-4)
        ]
        if matches:
            logits_index = None if isinstance(out, torch.Tensor) else matches[0]
    args = list(rec.experts_args) + list(rec.experts_kwargs.values())
    if len(args) >= 3 and isinstance(args[1], torch.Tensor) and args[1].dim() == 2:
        return args[1], logits_index, "experts_call"
    return None, logits_index, "router_dense_scores"


# --- expert, shared and extra bindings ----------------------------------------------------------------


@dataclass(frozen=True)
class Form:
    """One way of reading a part of the block: bindings plus the spec fields it implies."""

    label: str
    bindings: tuple[Binding, ...]
    spec: dict[str, Any] = field(default_factory=dict)


ROLE_PATTERNS = (
    ("gate_up", re.compile(r"gate_up|input_linear|w13|wi$")),
    ("gate", re.compile(r"gate|(^|\.)w1$|wi_0")),
    ("up", re.compile(r"up|(^|\.)v1$|(^|\.)w3$|wi_1")),
    ("down", re.compile(r"down|output_linear|(^|\.)w2$|wo$")),
)


def _role(name: str) -> str | None:
    leaf = name.rsplit(".", 1)[-1] if not name.endswith("weight") else name.rsplit(".", 2)[-2]
    leaf = leaf.removesuffix("_bias")
    return next((role for role, pattern in ROLE_PATTERNS if pattern.search(leaf)), None)


def expert_forms(block: nn.Module, facts: BlockFacts) -> tuple[list[Form], int, str | None]:
    """Expert readings: ``(forms, I, why-none)``. Layouts follow from shapes (H ≠ I ≠ 2I); what shapes
    cannot tell (concatenated vs interleaved gate/up) becomes separate forms."""
    E, H = facts.num_experts, facts.hidden
    prefix = facts.experts_path + "."
    tensors = {n: p for n, p in block.named_parameters() if n.startswith(prefix) and p.requires_grad}
    roles: dict[str, tuple[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        role = _role(name[len(prefix) :])
        if role is None:
            return [], 0, f"expert parameter {name} has no recognisable role"
        key = role + ("_bias" if "bias" in name.rsplit(".", 1)[-1] else "")
        roles[key] = (name, tensor)
    if "down" not in roles:
        return [], 0, "no down projection among the expert parameters"
    down_name, down = roles["down"]
    inter = _intermediate(down, E, H)
    if inter is None:
        return [], 0, f"down projection {down_name} {tuple(down.shape)} does not fit E={E}, H={H}"
    down_layout = _layout_of(down, E, H, inter, "down")
    if down_layout is None:
        return [], 0, f"down projection {down_name} {tuple(down.shape)} does not fit"
    bindings = [Binding(down_name, ("experts.w_down",), down_layout)]
    forms: list[tuple[str, list[Binding], str]] = []  # (label, bindings, gated?)
    if "gate_up" in roles:
        name, t = roles["gate_up"]
        if tuple(t.shape) == (E, 2 * inter, H):
            forms.append(
                ("fused rows [E,2I,H]", [Binding(name, ("experts.w_gate", "experts.w_up"), "gate_up_rows")], "gated")
            )
        elif tuple(t.shape) == (E, H, 2 * inter):
            forms.append(
                (
                    "fused transposed [E,H,2I]",
                    [Binding(name, ("experts.w_gate", "experts.w_up"), "gate_up_cols")],
                    "gated",
                )
            )
            forms.append(
                (
                    "fused transposed interleaved",
                    [Binding(name, ("experts.w_gate", "experts.w_up"), "gate_up_cols_interleaved")],
                    "gated",
                )
            )
        else:
            return [], 0, f"gate_up {name} {tuple(t.shape)} does not fit E={E}, H={H}, I={inter}"
    elif "up" in roles:
        parts = []
        for role in ("gate", "up"):
            if role in roles:
                name, t = roles[role]
                layout = _layout_of(t, E, H, inter, role)
                if layout is None:
                    return [], 0, f"{role} {name} {tuple(t.shape)} does not fit E={E}, H={H}, I={inter}"
                parts.append(Binding(name, (f"experts.w_{role}",), layout))
        gated = "gated" if "gate" in roles else "non-gated"
        forms.append((f"separate {'gate/up' if gated == 'gated' else 'up'} ({parts[-1].layout})", parts, gated))
    else:
        return [], 0, "no gate/up projection among the expert parameters"

    bias_bindings, bias_ok = _bias_bindings(roles, E, H, inter)
    result = []
    for label, parts, gated in forms:
        interleaved = parts[0].layout == "gate_up_cols_interleaved"
        biases = bias_bindings(interleaved)
        if biases is None:
            continue
        for mlp_label, mlp in mlp_forms(facts.mlp, gated == "gated"):
            spec = {**mlp, "bias": bool(biases), "intermediate": inter}
            result.append(
                Form(f"{label}, {mlp_label}" + (", biases" if biases else ""), tuple(parts + bindings + biases), spec)
            )
    if not result:
        return [], inter, bias_ok
    return result, inter, None


def _intermediate(down: torch.Tensor, E: int, H: int) -> int | None:
    shape = tuple(down.shape)
    if len(shape) == 3 and shape[0] == E and H in shape[1:]:
        return shape[2] if shape[1] == H else shape[1]
    if len(shape) == 2 and shape[1] == H and shape[0] % E == 0:
        return shape[0] // E  # flat [E·I, H] (DBRX)
    return None


def _layout_of(t: torch.Tensor, E: int, H: int, inter: int, role: str) -> str | None:
    """Layout of one expert tensor with canonical shape ``[E, I, H]`` (gate/up) or ``[E, H, I]`` (down)."""
    canonical = (E, H, inter) if role == "down" else (E, inter, H)
    shape = tuple(t.shape)
    if shape == canonical:
        return "identity"
    if shape == (canonical[0], canonical[2], canonical[1]):
        return "transposed"
    if shape == (E * inter, H):
        return "flat_experts_transposed" if role == "down" else "flat_experts"
    return None


def _bias_bindings(roles: dict[str, tuple[str, torch.Tensor]], E: int, H: int, inter: int) -> tuple[Any, str]:
    """A function ``interleaved -> bindings | None`` for the expert biases, and why they may not bind."""

    def make(interleaved: bool) -> list[Binding] | None:
        out: list[Binding] = []
        if "gate_up_bias" in roles:
            name, t = roles["gate_up_bias"]
            layout = "gate_up_bias_interleaved" if interleaved else "gate_up_bias_cat"
            if tuple(t.shape) != (E, 2 * inter) or layout not in LAYOUTS:
                return None
            out.append(Binding(name, ("experts.b_gate", "experts.b_up"), layout))
        for role in ("gate", "up"):
            if f"{role}_bias" in roles:
                out.append(Binding(roles[f"{role}_bias"][0], (f"experts.b_{role}",)))
        if "down_bias" in roles:
            out.append(Binding(roles["down_bias"][0], ("experts.b_down",)))
        return out

    return make, "expert biases in a layout moeconf has no binding for"


def _number(*values: Any) -> float | None:
    return next((float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)), None)


def mlp_hints(module: nn.Module, config: Any) -> MlpHints:
    """Activation and clamp / soft-cap constants of an MLP module (attributes first, then the config)."""
    fields = config_fields(type(config))
    gate_cap = next((n for n in fields if "softcap" in n and "gate" in n), None)
    up_cap = next((n for n in fields if "softcap" in n and "up" in n.replace("softcap", "")), None)
    caps = (
        (_number(getattr(config, gate_cap, None)), _number(getattr(config, up_cap, None)))
        if gate_cap and up_cap
        else None
    )
    return MlpHints(
        activation=_activation_of(module, config),
        limit=_number(
            getattr(module, "limit", None), getattr(module, "swiglu_limit", None), getattr(config, "swiglu_limit", None)
        ),
        alpha=_number(getattr(module, "alpha", None), getattr(config, "swiglu_alpha", None)),
        softcaps=caps if caps and all(c for c in caps) else None,  # type: ignore[arg-type]
    )


def mlp_forms(hints: MlpHints, gated: bool) -> list[tuple[str, dict[str, Any]]]:
    """``(label, ExpertSpec fields)`` for every MLP form the hints allow: the activation(s) for a plain
    (Swi)GLU or non-gated MLP, plus clamped / GPT-OSS / soft-capped forms where the constants exist."""
    acts = list(
        dict.fromkeys(([hints.activation] if hints.activation else []) + (["relu2"] if not gated else []) + ["silu"])
    )
    if not gated:
        return [(f"non-gated {a}", {"glu": "none", "activation": a}) for a in acts]
    forms: list[tuple[str, dict[str, Any]]] = [(f"swiglu({a})", {"glu": "swiglu", "activation": a}) for a in acts]
    if hints.limit is not None:
        for glu in ("clamped_swiglu", "clamped_after_act"):
            forms += [
                (f"{glu}({a}, L={hints.limit:g})", {"glu": glu, "activation": a, "gptoss_limit": hints.limit})
                for a in acts
            ]
        forms.append(
            (
                f"gptoss_clamped(L={hints.limit:g})",  # its activation is the formula's own
                {"glu": "gptoss_clamped", "gptoss_limit": hints.limit, "gptoss_alpha": hints.alpha or 1.702},
            )
        )
    if hints.softcaps is not None:
        gate_cap, up_cap = hints.softcaps
        forms.append(
            (
                f"softcapped_swiglu({gate_cap:g}, {up_cap:g})",
                {"glu": "softcapped_swiglu", "softcap_gate": gate_cap, "softcap_up": up_cap},
            )
        )
    return forms


def _linear_weight(module: nn.Module, name: str) -> torch.Tensor | None:
    child = getattr(module, name, None)
    return child.weight if isinstance(child, nn.Linear) else None


def _shared_projections(name: str, module: nn.Module, hidden: int) -> tuple[tuple[Binding, ...], int, bool] | None:
    """Bindings of a shared MLP made of ``nn.Linear`` projections (gate/up/down, fused gate_up/down, or
    up/down), its width ``S`` and whether it is gated; None when it is not such an MLP."""
    down = _linear_weight(module, "down_proj")
    if down is None or down.shape[0] != hidden:
        return None
    width = int(down.shape[1])
    fused = _linear_weight(module, "gate_up_proj")
    binds: tuple[Binding, ...]
    if fused is not None and tuple(fused.shape) == (2 * width, hidden):
        binds = (Binding(f"{name}.gate_up_proj.weight", ("shared.w_gate", "shared.w_up"), "gate_up_rows"),)
        gated = True
    elif _linear_weight(module, "up_proj") is not None:
        gated = _linear_weight(module, "gate_proj") is not None
        binds = tuple(
            Binding(f"{name}.{p}_proj.weight", (f"shared.w_{p}",)) for p in (("gate", "up") if gated else ("up",))
        )
    else:
        return None
    return binds + (Binding(f"{name}.down_proj.weight", ("shared.w_down",)),), width, gated


def shared_forms(block: nn.Module, facts: BlockFacts, config: Any) -> tuple[list[Form], str | None]:
    """Shared-expert readings: none, or an MLP (plain / clamped / non-gated ..., ungated or sigmoid-gated
    by a ``[1, H]`` weight), combined by sum or average."""
    children = [(n, c) for n, c in block.named_children() if SHARED_NAME.search(n) and not isinstance(c, nn.Linear)]
    gate = [
        (n, p)
        for n, p in block.named_parameters()
        if SHARED_NAME.search(n) and "gate" in n.split(".")[0] and tuple(p.shape) == (1, facts.hidden)
    ]
    if not children:
        return [Form("none", (), {"shared": None})], None
    name, module = children[0]
    found = _shared_projections(name, module, facts.hidden)
    if found is None:
        return [], f"shared expert(s) {name} ({type(module).__name__}) are not an MLP of nn.Linear projections"
    bindings, width, gated = found
    if any(isinstance(m, nn.Linear) and m.bias is not None for m in module.modules()):
        return [], f"shared MLP {name} has biases (no canonical parameter for them)"
    gate_kind = "none"
    if gate:
        bindings += (Binding(gate[0][0], ("shared.gate",)),)
        gate_kind = "sigmoid"
    label = f"{name} ({'sigmoid-gated' if gate_kind == 'sigmoid' else 'ungated'})"
    forms = []
    for mlp_label, mlp in mlp_forms(mlp_hints(module, config), gated):
        for combine in ("sum", "average"):
            # A plain SwiGLU is written with the ``activation`` shorthand; other forms need ``mlp``.
            plain = mlp["glu"] == "swiglu"
            shared = SharedSpec(
                width,
                gate=gate_kind,
                activation=mlp["activation"] if plain else "silu",  # type: ignore[arg-type]
                combine=combine,
                mlp=None if plain else ExpertSpec(**mlp),
            )  # type: ignore[arg-type]
            forms.append(Form(f"{label} {mlp_label}, {combine}", bindings, {"shared": shared}))
    return forms, None


def extra_forms(block: nn.Module, facts: BlockFacts, config: Any) -> tuple[Form, str | None]:
    """Bindings outside router/experts/shared: an RMSNorm on the block output (AXK1)."""
    taken = (facts.router_path, facts.experts_path)
    extra: list[Binding] = []
    spec: dict[str, Any] = {}
    for name, child in block.named_children():
        if name in taken or SHARED_NAME.search(name):
            continue
        params = [(n, p) for n, p in child.named_parameters() if p.requires_grad]
        if not params:
            continue
        if "norm" in name.lower() and len(params) == 1 and tuple(params[0][1].shape) == (facts.hidden,):
            eps = next(
                (getattr(child, a) for a in ("variance_epsilon", "eps") if isinstance(getattr(child, a, None), float)),
                1e-6,
            )
            extra.append(Binding(f"{name}.{params[0][0]}", ("output_norm.weight",)))
            spec["output_norm_eps"] = eps
            continue
        if "gate" in name.lower() and SHARED_NAME.search(name):
            continue
        return Form("", ()), f"block child {name} ({type(child).__name__}) has parameters moeconf cannot bind"
    return Form("output norm" if extra else "", tuple(extra), spec), None


# --- 4. router candidates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterCandidate:
    label: str
    spec: RouterSpec
    weight_site: str = "output"


def _config_value(config: Any, names: Iterable[str]) -> Any:
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)


def router_candidates(facts: BlockFacts, config: Any) -> list[RouterCandidate]:
    """§4 R1-R6 (+ Llama-4, Kolibri) with the options the block and config allow."""
    biased = facts.selection_bias is not None
    base: dict[str, Any] = {"logit_bias": facts.router_bias is not None, "selection_bias": biased}
    softcap = next(
        (
            float(getattr(config, n))
            for n in config_fields(type(config))
            if "softcap" in n and "router" in n and isinstance(getattr(config, n, None), (int, float))
        ),
        None,
    )
    if softcap:  # 0 / None: no soft-capping
        base["logit_softcap"] = softcap
    families: list[tuple[str, dict[str, Any]]] = []
    for scoring in ("softmax", "sigmoid", "sqrtsoftplus"):
        for renorm in ("never", "always"):
            eps = 0.0 if scoring == "softmax" else 1e-20
            families.append(
                (
                    f"{scoring}{'+bias' if biased else ''}→top-k{'→renorm' if renorm == 'always' else ''}",
                    {"scoring": scoring, "renorm": renorm, "renorm_eps": eps if renorm == "always" else 0.0},
                )
            )
    p = _config_value(config, ("moe_normalize_expert_weights",)) or _config_value(
        getattr(config, "ffn_config", None), ("moe_normalize_expert_weights",)
    )
    if isinstance(p, (int, float)) and p not in (1, 1.0):
        families.append((f"softmax→top-k→{p}-norm", {"scoring": "softmax", "renorm": "pnorm", "renorm_p": float(p)}))
    families.append(
        (
            "top-k(logits)→softmax",
            {"scoring": "softmax", "select_on": "logits", "weight_from": "softmax_of_selected_logits"},
        )
    )
    for renorm in ("never", "always"):
        families.append(
            (
                f"top-k(logits{'+bias' if biased else ''})→sigmoid{'→renorm' if renorm == 'always' else ''}",
                {
                    "scoring": "sigmoid",
                    "select_on": "logits",
                    "weight_from": "sigmoid_of_selected_logits",
                    "renorm": renorm,
                },
            )
        )

    groups: list[GroupLimit | None] = [None]
    n_group = _config_int(config, GROUP_FIELDS[0]) or 0
    topk_group = _config_int(config, GROUP_FIELDS[1]) or 0
    if n_group > 1 and facts.num_experts % n_group == 0 and 0 < topk_group <= n_group:
        groups += [
            GroupLimit(n_group, topk_group, score, fill)  # type: ignore[arg-type]
            for score in ("top2sum", "max")
            for fill in ("-inf", "zero")
        ]
    scale = _config_value(config, SCALING_FIELDS)
    scalings = [(1.0, "weights")]
    if isinstance(scale, (int, float)) and float(scale) != 1.0:
        scalings += [(float(scale), "weights"), (float(scale), "output")]

    out = []
    for label, kwargs in families:
        for group in groups if kwargs.get("select_on", "scores") == "scores" else [None]:
            for scaling, site in scalings:
                spec = RouterSpec(**{**base, **kwargs}, group_limit=group, routed_scaling=scaling, scaling_site=site)  # type: ignore[arg-type]
                text = label + (
                    f", groups {group.n_group}/{group.topk_group} {group.score} fill {group.fill}" if group else ""
                )
                text += f", λ={scaling:g}@{site}" if scaling != 1.0 else ""
                out.append(RouterCandidate(text, spec))
                if facts.routing_from == "router_dense_scores":
                    out.append(RouterCandidate(text + ", weight scales input", spec, weight_site="input"))
    # OpenAI privacy filter: top-k(logits)→softmax weights divided by k, routed output multiplied by k.
    k = facts.top_k
    if k > 1:
        spec = RouterSpec(
            **base,
            select_on="logits",
            weight_from="softmax_of_selected_logits",
            routed_scaling=1 / k,
            output_scale=float(k),
        )
        out.append(RouterCandidate(f"top-k(logits)→softmax, weights/{k}, output×{k}", spec))
    return out


def source_affinity(candidate: RouterCandidate, glu: str, facts: BlockFacts) -> int:
    """How well a candidate agrees with the router/block source; breaks ties between numerically
    equivalent readings (top-k on logits→softmax ≡ softmax→top-k→renorm; sigmoid is monotone; group
    fill value; clamp forms)."""
    src, score = facts.source, 0
    subjects = re.findall(r"topk\(\s*([^,]+?)\s*,", src) + re.findall(r"([\w\.\]\[]+)\s*\.topk\(", src)
    logit_topk = any(
        re.search(r"logit", s) and not re.search(r"prob|score|sigmoid|softmax|weight|bias", s) for s in subjects
    )
    r = candidate.spec
    score += 1 if (r.select_on == "logits") == logit_topk else 0
    if r.group_limit is not None:
        zero_fill = bool(re.search(r"masked_fill\(.*,\s*0(\.0)?\s*\)\s*$", src, re.MULTILINE))
        score += 1 if (r.group_limit.fill == "zero") == zero_fill else 0
    if glu in ("clamped_swiglu", "clamped_after_act", "gptoss_clamped"):
        exp_src = facts.experts_source
        after = bool(re.search(r"act_fn\([^()]*\)\s*\.clamp|clamp\(\s*self\.act_fn", exp_src))
        score += 1 if (glu == "clamped_after_act") == after else 0
        score += 1 if (glu == "gptoss_clamped") == ("alpha" in exp_src) else 0
        score += 1 if "clamp" in exp_src else -1
    return score


def _simplicity(candidate: RouterCandidate) -> int:
    r = candidate.spec
    return (
        -(r.renorm != "never")
        - (r.group_limit is not None)
        - (r.routed_scaling != 1.0)
        - (candidate.weight_site != "output")
    )


# --- 5. evaluation ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One tried reading of the block and how far it is from the reference.

    Attributes:
        router, experts, shared: labels of the router family / expert form / shared form.
        entry: the candidate as a registry entry (None if it could not even be built).
        routing_mismatch: tokens routed to a different expert set (None: routing not observable).
        weights_error, output_error: max |actual − expected| / max(1, max|expected|).
        matched: routing, weights and output within the fp32 tolerances.
        affinity: agreement with the router source (tie-break).
        message: why it failed, if it did.
    """

    router: str
    experts: str
    shared: str
    entry: ArchEntry | None
    routing_mismatch: int | None
    weights_error: float | None
    output_error: float | None
    matched: bool
    affinity: int = 0
    simplicity: int = 0
    message: str = ""

    @property
    def name(self) -> str:
        return f"router={self.router} | experts={self.experts} | shared={self.shared}"

    @property
    def max_error(self) -> float:
        errs = [e for e in (self.weights_error, self.output_error) if e is not None]
        return max(errs) if errs else math.inf

    def rank_key(self) -> tuple[Any, ...]:
        """Matches first (source agreement, then the simpler reading break ties); then the closest misses."""
        if self.matched:
            return (0, -self.affinity, -self.simplicity, self.max_error)
        mismatch = self.routing_mismatch if self.routing_mismatch is not None else 0
        return (1, mismatch, self.max_error)


@dataclass
class DiscoveryResult:
    """Everything ``discover`` found for one model type (``candidates`` ranked best first)."""

    model_type: str
    candidates: list[Candidate]
    best: Candidate | None
    proposed_entry: ArchEntry | None
    proposed_entry_source: str | None
    explanation: str = ""
    site: Site | None = None
    parity: list[Any] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.proposed_entry is not None


POOL_SHAPE = (8, 64)
"""Tokens the block runs on once per parameter set; each candidate keeps those it routes with a margin."""


@dataclass
class _Observed:
    output: torch.Tensor
    index: torch.Tensor | None
    weights: torch.Tensor | None
    error: str = ""


def _fingerprint(params: Params) -> str:
    digest = hashlib.sha1()
    for name in sorted(params):
        digest.update(name.encode())
        digest.update(params[name].numpy().tobytes())
    return digest.hexdigest()


def _run_block(entry: ArchEntry, params: Params, hidden: torch.Tensor) -> _Observed:
    """The block (fp32, eager, train mode) on ``hidden [B, S, H]`` with ``params`` loaded."""
    try:
        block = build_block(entry, "eager")
        load_params(entry, block, params)
        block.train(entry.train_mode)
        with torch.no_grad(), recording(entry, block) as rec:
            out = block(hidden.to(torch.float32))
        out = (out[0] if isinstance(out, tuple) else out).reshape(hidden.shape)
        index, weights = rec.routing(entry)
        return _Observed(
            out.double(),
            None if index is None else index.detach().long(),
            None if weights is None else weights.detach().double(),
        )
    except Exception as exc:  # a candidate whose bindings do not fit: report, keep going
        return _Observed(torch.empty(0), None, None, f"{type(exc).__name__}: {_short(exc, 300)}")


def _normalised_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return float((actual - expected).abs().max()) / max(1.0, float(expected.abs().max()))


def _evaluate(
    entry: ArchEntry, observed: _Observed, params: Params, pool: torch.Tensor, routing_only: bool
) -> tuple[int | None, float | None, float | None, bool, str]:
    """Compare one candidate with the block's observation on the tokens it routes with a margin."""
    if observed.error:
        return None, None, None, False, observed.error
    spec = entry.spec
    flat = pool.reshape(-1, spec.hidden)
    routing = route(spec, params, flat)
    keep = routing.margin >= MIN_MARGIN
    if int(keep.sum()) < 16:
        return None, None, None, False, f"only {int(keep.sum())} tokens route with a margin"
    tol = TOLERANCES["fp32"]
    mismatch = None
    weights_err = None
    ok = True
    messages = []
    if observed.index is not None:
        got = observed.index.sort(dim=-1).values
        if got.shape != routing.index.shape:
            return got.shape[0], None, None, False, f"observed top-k {tuple(got.shape)} != {tuple(routing.index.shape)}"
        same = (got == routing.index).all(dim=-1)
        mismatch = int((~same & keep).sum())
        ok &= mismatch == 0
        if observed.weights is not None:
            order = observed.index.argsort(dim=-1)
            got_w = observed.weights.gather(1, order)
            both = same & keep
            if both.any():
                outcome = compare("weights", got_w[both], routing.weights.detach()[both], tol["routing_weights"])
                weights_err = _normalised_error(got_w[both], routing.weights.detach()[both])
                ok &= bool(outcome.passed)
                if not outcome.passed:
                    messages.append(outcome.message)
        if mismatch:
            messages.insert(0, f"{mismatch}/{int(keep.sum())} tokens routed differently")
    if routing_only:
        return mismatch, weights_err, None, ok, "; ".join(messages)
    reference = reference_forward(spec, params, pool)
    want = reference.output.reshape(-1, spec.hidden)[keep]
    got_out = observed.output.reshape(-1, spec.hidden)[keep]
    outcome = compare("output", got_out, want.detach(), tol["output"])
    ok &= bool(outcome.passed)
    if not outcome.passed:
        messages.append(outcome.message)
    return mismatch, weights_err, _normalised_error(got_out, want.detach()), ok, "; ".join(messages)


# --- 6. discover --------------------------------------------------------------------------------------


def _losses(site: Site) -> tuple[LossSpec, str | None]:
    """Aux loss iff the modeling module calls its ``load_balancing_loss_func``; the coefficient attribute
    from the source (``config.router_aux_loss_coef``, ``config.ffn_config.moe_loss_weight`` ...)."""
    module = importlib.import_module(site.modeling_module)
    source = _source(module)  # type: ignore[arg-type]
    if not hasattr(module, "load_balancing_loss_func") or len(re.findall(r"load_balancing_loss_func\(", source)) < 2:
        return LossSpec(), None
    coefs = re.findall(r"config((?:\.\w+)*)\.(\w*(?:aux_loss_coef|loss_weight))\b", source)
    attr = None
    if coefs:
        path, name = coefs[0]
        attr = (path.lstrip(".") + "." if path else "") + name
    return LossSpec(aux="switch"), attr


def _pool(hidden: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    return torch.randn(*POOL_SHAPE, hidden, generator=gen, dtype=torch.float64).to(torch.float32).to(torch.float64)


def discover(
    model_type: str, config_kwargs: Mapping[str, Any] | None = None, verify: bool = True, seed: int = 0
) -> DiscoveryResult:
    """Find the spec and bindings of ``model_type``'s MoE block by trying candidates against it.

    Args:
        model_type: an installed transformers model type.
        config_kwargs: use this tiny config instead of the generic shrink (e.g. an existing entry's).
        verify: run the proposed entry through the engine (``run_group``, hf-eager, fp32, every case).
        seed: parameter/token seed.
    """
    start = time.perf_counter()
    result = DiscoveryResult(model_type, [], None, None, None)
    try:
        site, _log = locate(model_type, config_kwargs)
        result.site = site
        block, facts, config = read_block(site)
    except Exception as exc:
        result.explanation = f"could not build and read a tiny {model_type} MoE block: {_short(exc, 400)}"
        result.wall_s = time.perf_counter() - start
        return result

    experts, _inter, why_experts = expert_forms(block, facts)
    shared, why_shared = shared_forms(block, facts, config)
    extra, why_extra = extra_forms(block, facts, config)
    problems = [w for w in (why_experts, why_shared, why_extra) if w]
    if not experts or not shared or why_extra:
        result.explanation = "no candidate can bind every block parameter: " + "; ".join(problems)
        result.wall_s = time.perf_counter() - start
        return result

    losses, aux_attr = _losses(site)
    routers = router_candidates(facts, config)
    base_bindings: tuple[Binding, ...] = (Binding(facts.router_weight, ("router.weight",)),)
    if facts.router_bias:
        base_bindings += (Binding(facts.router_bias, ("router.bias",)),)
    if facts.selection_bias:
        base_bindings += (Binding(facts.selection_bias[0], ("router.selection_bias",), facts.selection_bias[1]),)
    pool = _pool(facts.hidden, seed)

    def make(router: RouterCandidate, expert: Form, shared_form: Form) -> ArchEntry:
        ex = expert.spec
        spec = MoESpec(
            facts.num_experts,
            facts.top_k,
            facts.hidden,
            ex["intermediate"],
            router=router.spec,
            experts=ExpertSpec(**{k: v for k, v in ex.items() if k != "intermediate"}, weight_site=router.weight_site),  # type: ignore[arg-type]
            shared=shared_form.spec["shared"],
            losses=losses,
            **extra.spec,
        )
        return _probe_entry(
            site,
            spec,
            base_bindings + expert.bindings + shared_form.bindings + extra.bindings,
            model_type=model_type,
            router_path=facts.router_path,
            experts_path=facts.experts_path,
            router_logits_index=facts.router_logits_index,
            routing_from=facts.routing_from,
            aux_coef_attr=aux_attr if losses.aux != "none" else None,
            experts_implementations=("eager", "grouped_mm", "batched_mm") if facts.decorated else ("eager",),
        )

    cache: dict[str, tuple[_Observed, Params]] = {}

    def observe(entry: ArchEntry) -> tuple[_Observed, Params]:
        params = round_through(draw_params(entry.spec, seed), torch.float32)
        key = _fingerprint(params) + "|" + "|".join(f"{b.path}:{b.layout}" for b in entry.params)
        if key not in cache:
            cache[key] = (_run_block(entry, params, pool), params)
        return cache[key]

    def evaluate(router: RouterCandidate, expert: Form, shared_form: Form, routing_only: bool) -> Candidate:
        try:
            entry = make(router, expert, shared_form)
        except ValueError as exc:
            return Candidate(
                router.label, expert.label, shared_form.label, None, None, None, None, False, message=str(exc)
            )
        observed, params = observe(entry)
        mismatch, w_err, o_err, ok, message = _evaluate(entry, observed, params, pool, routing_only)
        return Candidate(
            router.label,
            expert.label,
            shared_form.label,
            entry,
            mismatch,
            w_err,
            o_err,
            ok and not routing_only,
            source_affinity(router, expert.spec["glu"], facts),
            _simplicity(router),
            message,
        )

    # Stage 1: routing (index sets and weights) alone decides among router families.
    stage1 = [evaluate(r, experts[0], shared[0], routing_only=True) for r in routers]
    routed = [r for r, c in zip(routers, stage1) if c.entry is not None and c.routing_mismatch == 0 and not c.message]
    if not routed:  # routing unobservable or nothing routes alike: the outputs of the first form decide
        by_output = sorted(
            zip(routers, (evaluate(r, experts[0], shared[0], routing_only=False) for r in routers)),
            key=lambda rc: rc[1].rank_key(),
        )
        routed = [r for r, _ in by_output[:3]]
    # Stage 2: every expert and shared form for the router families that route alike.
    stage2 = [evaluate(r, e, s, routing_only=False) for r in routed for e in experts for s in shared]
    tried = {(c.router, c.experts, c.shared) for c in stage2}
    candidates = sorted(
        stage2 + [c for c in stage1 if (c.router, c.experts, c.shared) not in tried], key=lambda c: c.rank_key()
    )
    result.candidates = candidates
    best = candidates[0] if candidates and candidates[0].matched else None
    result.best = best
    if best is None:
        result.explanation = _no_match(model_type, candidates, problems)
    else:
        result.proposed_entry = best.entry
        result.proposed_entry_source = entry_source(best.entry)  # type: ignore[arg-type]
        if verify:
            result.parity = verify_entry(best.entry)  # type: ignore[arg-type]
    result.wall_s = time.perf_counter() - start
    return result


def _no_match(model_type: str, candidates: Sequence[Candidate], problems: Sequence[str]) -> str:
    closest = candidates[0] if candidates else None
    lines = [f"no candidate reproduces the {model_type} block within the fp32 tolerances."]
    if closest is not None:
        lines.append(
            f"closest: {closest.name} (max error {closest.max_error:.3g}"
            + (f", {closest.routing_mismatch} tokens routed differently" if closest.routing_mismatch else "")
            + f"): {closest.message}"
        )
    lines.append(
        "The block may compute something the spec cannot express yet (a new router family, expert "
        "activation, identity experts, per-expert scales, extra forward inputs): add the field to "
        "moeconf/spec.py and its formula to moeconf/reference/, then retry."
    )
    lines += problems
    return "\n".join(lines)


def verify_entry(entry: ArchEntry) -> list[Any]:
    """The engine's fp32 hf-eager records of ``entry`` on every case (``moeconf check`` parity)."""
    from moeconf.backends import resolve_backend
    from moeconf.harness import engine
    from moeconf.harness.cases import CASES

    sel = engine.Selection(archs=(entry.model_type,))
    backends = {"hf-eager": resolve_backend("hf-eager")}
    run_arch = getattr(engine, "run_arch", None)
    if run_arch is not None:  # the engine runs an (arch, dtype) at a time
        groups = run_arch(sel, entry, backends, "fp32")
    else:  # older engine: one (arch, dtype, case) at a time
        run_group = getattr(engine, "run_group")  # noqa: B009
        groups = (g for case in CASES for g in run_group(sel, entry, backends, "fp32", case))
    return [r for group in groups for r in group]


# --- 7. output ----------------------------------------------------------------------------------------


def _value_source(value: Any, indent: int = 0) -> str:
    """Python source for a spec value: dataclasses with their non-default fields only."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        args = []
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else (f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            )  # type: ignore[misc]
            if default is dataclasses.MISSING or v != default:
                args.append(f"{f.name}={_value_source(v)}")
        return f"{type(value).__name__}({', '.join(args)})"
    return repr(value)


def entry_source(entry: ArchEntry) -> str:
    """The entry as Python source, ready to paste into a registry module."""
    bindings = ",\n".join(
        f"        Binding({b.path!r}, {b.canonical!r}" + (f", {b.layout!r}" if b.layout != "identity" else "") + ")"
        for b in entry.params
    )
    fields = [
        f"model_type={entry.model_type!r}",
        f"config_class={entry.config_class!r}",
        f"config_kwargs={entry.config_kwargs!r}",
        f"modeling_module={entry.modeling_module!r}",
        f"block_class={entry.block_class!r}",
        f"block_path={entry.block_path!r}",
        f"model_class={entry.model_class!r}",
        f"spec={_value_source(entry.spec)}",
        f"params=(\n{bindings},\n    )",
        f"router_path={entry.router_path!r}",
        f"experts_path={entry.experts_path!r}",
    ]
    defaults = {f.name: f.default for f in dataclasses.fields(ArchEntry) if f.default is not dataclasses.MISSING}
    for name in (
        "router_logits_index",
        "routing_from",
        "aux_coef_attr",
        "block_init",
        "block_config_attr",
        "experts_implementations",
    ):
        value = getattr(entry, name)
        if value != defaults.get(name):
            fields.append(f"{name}={value!r}")
    return "ArchEntry(\n" + "".join(f"    {f},\n" for f in fields) + ")"


SOURCE_IMPORTS = (
    "from moeconf.registry.entry import ArchEntry, Binding\n"
    "from moeconf.spec import Capacity, ExpertSpec, GroupLimit, LossSpec, MoESpec, RouterSpec, SharedSpec\n"
)


def render_text(result: DiscoveryResult, limit: int = 15) -> str:
    lines = [f"moeconf discover {result.model_type}"]
    if result.site is not None:
        s = result.site
        lines.append(f"block: {s.block_class} at {s.model_class}.{s.block_path} ({s.modeling_module})")
    if result.candidates:
        lines.append(f"\n{'#':>3}  {'match':<5} {'routing':<8} {'max err':>9}  candidate")
        for i, c in enumerate(result.candidates[:limit], 1):
            routing = (
                "-"
                if c.routing_mismatch is None
                else ("ok" if c.routing_mismatch == 0 else f"{c.routing_mismatch} off")
            )
            err = "-" if c.max_error == math.inf else f"{c.max_error:.2e}"
            lines.append(f"{i:>3}  {'yes' if c.matched else 'no':<5} {routing:<8} {err:>9}  {c.name}")
        if len(result.candidates) > limit:
            lines.append(f"     ... {len(result.candidates) - limit} more candidates")
    if result.proposed_entry_source:
        lines.append("\nproposed registry entry:\n")
        lines.append(SOURCE_IMPORTS + "\n" + result.proposed_entry_source)
        if result.parity:
            bad = [r for r in result.parity if r.status in ("fail", "error")]
            lines.append(
                f"\nparity (hf-eager, fp32, every case): {len(result.parity) - len(bad)}/{len(result.parity)} records pass"
                + "".join(f"\n  - {r.case}/{r.check}: {r.status}: {r.message}" for r in bad[:5])
            )
    if result.explanation:
        lines.append("\n" + result.explanation)
    lines.append(f"\n({len(result.candidates)} candidates, {result.wall_s:.1f} s)")
    return "\n".join(lines) + "\n"


def render_json(result: DiscoveryResult) -> str:
    return json.dumps(
        {
            "model_type": result.model_type,
            "ok": result.ok,
            "block": dataclasses.asdict(result.site) if result.site else None,
            "candidates": [
                {
                    "candidate": c.name,
                    "matched": c.matched,
                    "routing_mismatch": c.routing_mismatch,
                    "weights_error": c.weights_error,
                    "output_error": c.output_error,
                    "message": c.message,
                }
                for c in result.candidates
            ],
            "proposed_entry_source": result.proposed_entry_source,
            "parity": [r.to_dict() for r in result.parity],
            "explanation": result.explanation,
            "wall_s": result.wall_s,
        },
        indent=1,
        default=str,
    )


def main_discover(argv: list[str]) -> int:
    """``moeconf discover MODEL_TYPE [--format text|json]``: 0 proposed, 1 nothing matches, 2 usage."""
    parser = argparse.ArgumentParser(
        prog="moeconf discover", description="Propose a registry entry for a transformers MoE model type."
    )
    parser.add_argument("model_type")
    parser.add_argument("--format", default="text", choices=("text", "json"))
    parser.add_argument(
        "--config-kwargs",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="tiny config keyword arguments to use instead of the generic shrink",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from transformers import CONFIG_MAPPING

    if args.model_type not in CONFIG_MAPPING:
        print(f"moeconf discover: error: transformers has no model type {args.model_type!r}", file=sys.stderr)
        return EXIT_USAGE
    result = discover(args.model_type, args.config_kwargs, verify=True, seed=args.seed)
    sys.stdout.write(render_json(result) + "\n" if args.format == "json" else render_text(result))
    if not result.ok:
        return EXIT_NO_MATCH
    return EXIT_NO_MATCH if any(r.status in ("fail", "error") for r in result.parity) else EXIT_OK


__all__ = [
    "Candidate",
    "DiscoveryResult",
    "discover",
    "entry_source",
    "main_discover",
    "router_candidates",
    "shrink_kwargs",
    "verify_entry",
]
