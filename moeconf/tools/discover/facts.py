"""Step 3 of discover: what the block's structure and one hooked forward say about it.

Structure gives the router and experts children, the router weight ``[R, H]`` and biases, and the MLP
hints (activation, clamp and soft-cap constants); one forward tells which router output is the
logits ``x Wᵀ (+b)`` and whether the experts receive ``(x, index, weights)``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import nn

from moeconf.harness.checks import TOLERANCES, compare
from moeconf.hf.block import EntryError, block_config, build_block, build_config, recording
from moeconf.registry.entry import ArchEntry
from moeconf.tools.discover.config import TOPK_FIELDS, config_fields, config_int
from moeconf.tools.discover.locate import Site, is_experts, is_router
from moeconf.tools.discover.rank import pool_tokens

PROBE_TOKENS = 4
"""Tokens of the structural forward: any few tokens show where the logits are and what the experts get."""

ACT_FIELDS = ("hidden_act", "mlp_hidden_act", "hidden_activation", "activation_function")
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
"""transformers activation names (config fields) → spec activation."""
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
"""transformers activation classes (a module's ``act_fn``) → spec activation."""


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
    decorated: bool  # experts accept transformers' grouped_mm / batched_mm implementations
    mlp: MlpHints
    hints: SourceHints


def _number(*values: Any) -> float | None:
    return next((float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)), None)


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
    limit = _number(
        getattr(module, "limit", None), getattr(module, "swiglu_limit", None), getattr(config, "swiglu_limit", None)
    )
    return MlpHints(
        activation=_activation_of(module, config),
        limit=limit,
        alpha=_number(getattr(module, "alpha", None), getattr(config, "swiglu_alpha", None)),
        softcaps=caps if caps and all(c for c in caps) else None,  # type: ignore[arg-type]
    )


def source_of(obj: Any) -> str:
    """Python source of a class or module ("" where there is none, e.g. a compiled one)."""
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


@cache
def _class_sources(module_name: str) -> dict[str, str]:
    """Top-level class name → source, from one parse of the module (``inspect.getsource`` parses the
    whole module again for every class, and modeling modules are large)."""
    source = source_of(sys.modules[module_name])
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {}
    classes = (node for node in tree.body if isinstance(node, ast.ClassDef))
    return {node.name: ast.get_source_segment(source, node) or "" for node in classes}


def class_source(cls: type) -> str:
    """Python source of a class ("" where there is none)."""
    return _class_sources(cls.__module__).get(cls.__qualname__) or source_of(cls)


@dataclass(frozen=True)
class SourceHints:
    """What the source code says where the numbers cannot tell readings apart.

    Attributes:
        topk_on_logits: the router/block applies ``topk`` to logits, not to probabilities or scores
            (top-k on logits → softmax ≡ softmax → top-k → renormalise).
        zero_fill: masked expert groups are filled with 0, not -inf.
        clamps: the experts clamp; ``clamp_after_act``: the activated gate (``act_fn(gate).clamp``);
            ``alpha``: with GPT-OSS's sharpness α.
    """

    topk_on_logits: bool
    zero_fill: bool
    clamps: bool
    clamp_after_act: bool
    alpha: bool


def source_hints(router_source: str, experts_source: str) -> SourceHints:
    """Read ``SourceHints`` from the router + block source and the experts source."""
    subjects = re.findall(r"topk\(\s*([^,]+?)\s*,", router_source)
    subjects += re.findall(r"([\w\.\]\[]+)\s*\.topk\(", router_source)
    return SourceHints(
        topk_on_logits=any(
            re.search(r"logit", s) and not re.search(r"prob|score|sigmoid|softmax|weight|bias", s) for s in subjects
        ),
        zero_fill=bool(re.search(r"masked_fill\(.*,\s*0(\.0)?\s*\)\s*$", router_source, re.MULTILINE)),
        clamps="clamp" in experts_source,
        clamp_after_act=bool(re.search(r"act_fn\([^()]*\)\s*\.clamp|clamp\(\s*self\.act_fn", experts_source)),
        alpha="alpha" in experts_source,
    )


def _child_path(block: nn.Module, predicate: Any) -> str | None:
    return next((n for n, c in block.named_children() if predicate(n, c)), None)


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


def _logits_index(out: Any, router_in: Any, weight: torch.Tensor, bias: torch.Tensor | None) -> int | None:
    """Which router output is ``x Wᵀ (+b)``: None when the output is that tensor itself, else its index
    in the output tuple (0 when nothing matches: the entry default)."""
    if not isinstance(router_in, torch.Tensor):
        return 0
    hidden = weight.shape[1]
    expected = torch.nn.functional.linear(router_in.reshape(-1, hidden).double(), weight.double(), bias)
    outputs = [out] if isinstance(out, torch.Tensor) else list(out) if isinstance(out, tuple) else []
    tol = TOLERANCES["fp32"]["output"]  # the router runs in fp32 like the block's output
    matches = [
        i
        for i, o in enumerate(outputs)
        if isinstance(o, torch.Tensor)
        and o.shape[-1] == expected.shape[-1]
        and o.numel() == expected.numel()
        and compare("router logits", o.reshape(expected.shape), expected, tol).passed
    ]
    if not matches:
        return 0
    return None if isinstance(out, torch.Tensor) else matches[0]


def _observe(block: nn.Module, entry: ArchEntry, tokens: torch.Tensor) -> tuple[Any, Any, tuple[Any, ...]]:
    """One forward of ``tokens [1, T, H]``: the router's input and output, and the experts' call arguments."""
    seen: dict[str, Any] = {}

    def on_router(_m: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        seen["in"], seen["out"] = (args[0] if args else None), output

    handle = block.get_submodule(entry.router_path).register_forward_hook(on_router)
    try:
        with torch.no_grad(), recording(entry, block) as rec:
            block.train()(tokens.to(torch.float32))
    finally:
        handle.remove()
    return seen.get("in"), seen.get("out"), tuple(rec.experts_args) + tuple(rec.experts_kwargs.values())


def _router_tensors(router: nn.Module, path: str) -> tuple[str, torch.Tensor, str | None]:
    """``(weight path, weight [R, H], trainable logit-bias path)`` of the router at ``path``."""
    weights = [(f"{path}.{n}", p) for n, p in router.named_parameters() if p.dim() == 2 and "bias" not in n]
    if len(weights) != 1:
        raise EntryError(f"{type(router).__name__} at {path} has {len(weights)} 2-D weights (expected 1)")
    name, weight = weights[0]
    rows = weight.shape[0]
    biases = [n for n, p in router.named_parameters() if p.dim() == 1 and p.requires_grad and p.shape[0] == rows]
    return name, weight.detach(), f"{path}.{biases[0]}" if biases else None


def read_block(site: Site, seed: int) -> tuple[nn.Module, BlockFacts, Any]:
    """Build the real block and read its structure; one forward on pool tokens (``seed``) tells the
    router output layout and whether the experts receive ``(x, index [N, k], weights [N, k])``."""
    probe = site.probe_entry()
    block = build_block(probe, "eager")
    config = block_config(probe, build_config(probe))
    router_path = _child_path(block, is_router)
    experts_path = _child_path(block, is_experts)
    if router_path is None or experts_path is None:
        raise EntryError(f"{site.block_class}: no router/experts child")
    router = block.get_submodule(router_path)
    router_weight, weight, router_bias = _router_tensors(router, router_path)
    rows, hidden = weight.shape
    entry = dataclasses.replace(probe, router_path=router_path, experts_path=experts_path)
    router_in, router_out, experts_args = _observe(block, entry, pool_tokens(hidden, seed)[None, :PROBE_TOKENS])
    bias = block.get_parameter(router_bias).detach().double() if router_bias else None
    receives_routing = (
        len(experts_args) >= 3 and isinstance(experts_args[1], torch.Tensor) and experts_args[1].dim() == 2
    )
    experts = block.get_submodule(experts_path)
    facts = BlockFacts(
        router_path=router_path,
        experts_path=experts_path,
        router_weight=router_weight,
        router_bias=router_bias,
        selection_bias=_selection_bias(block, rows, router_bias),
        hidden=hidden,
        num_experts=rows,
        top_k=experts_args[1].shape[-1] if receives_routing else (config_int(config, TOPK_FIELDS) or 1),
        router_logits_index=_logits_index(router_out, router_in, weight, bias),
        routing_from="experts_call" if receives_routing else "router_dense_scores",
        decorated=hasattr(experts, "is_concatenated"),
        mlp=mlp_hints(experts, config),
        hints=source_hints(class_source(type(router)) + "\n" + class_source(type(block)), class_source(type(experts))),
    )
    return block, facts, config
