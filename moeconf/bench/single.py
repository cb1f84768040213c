"""Single-process figures: the backend's prepared block, timed at the block or at its experts call.

The block is what the backend runs (``backend.prepare(request)``: built from the resized registry entry,
seeded parameters loaded through the entry's bindings, the backend's patch applied), so the router
family, the experts' form and the layout are the architecture's own.

- ``natural`` routing: the whole block on random inputs ``[1, N, H]`` (level ``block``);
- imposed routing: the experts module called as ``experts(hidden [N, H], top_k_index [N, k],
  top_k_weights [N, k])`` with the requested expert loads (level ``experts``); only where the entry's
  routing reaches the experts through that call (``routing_from == "experts_call"``).

``fwd`` runs under ``torch.no_grad()`` (inference); ``fwdbwd`` builds the graph and backpropagates a
random output gradient into the input, every trained weight and (experts level) the routing weights,
with gradients set to None before each call (as ``zero_grad(set_to_none=True)`` does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeconf.backends import Backend, RunRequest
from moeconf.bench.flops import Level, Pass
from moeconf.bench.routing import Routing, expert_loads, imposed_routing
from moeconf.devices import DTYPES
from moeconf.hf.block import recording
from moeconf.params import Params, param_shapes
from moeconf.registry.entry import ArchEntry
from moeconf.spec import MoESpec

ZERO_INIT = ("router.bias", "router.selection_bias", "experts.b_gate", "experts.b_up", "experts.b_down")


def random_params(spec: MoESpec, dtype: torch.dtype, seed: int = 0) -> Params:
    """Canonical parameters for timing: weights ``N(0, 1/fan_in)`` (unit-scale activations, so no
    clamp, softcap or denormal makes the timing unrepresentative), biases 0, norm weights 1."""
    generator = torch.Generator().manual_seed(seed)
    params: Params = {}
    for name, shape in param_shapes(spec).items():
        if name in ZERO_INIT:
            params[name] = torch.zeros(shape, dtype=dtype)
        elif name == "output_norm.weight":
            params[name] = torch.ones(shape, dtype=dtype)
        else:
            params[name] = torch.randn(shape, generator=generator, dtype=dtype) * shape[-1] ** -0.5
    return params


def prepare_block(backend: Backend, entry: ArchEntry, dtype: str, device: str, seed: int = 0) -> nn.Module:
    """The backend's block at the entry's sizes, on ``device`` in ``dtype``."""
    torch_dtype = DTYPES[dtype]
    params = random_params(entry.spec, torch_dtype, seed)
    empty = torch.empty(0)
    request = RunRequest(entry, params, empty, empty, empty, torch_dtype, device)
    block = backend.prepare(request)  # type: ignore[attr-defined]
    del params, request
    return block


@dataclass
class TimedCall:
    """The callable of one figure and what the byte count needs to know."""

    call: Callable[[], object]
    level: Level
    experts_touched: int
    note: str = ""


def _first(output: Any) -> torch.Tensor:
    """Blocks return a tensor, or ``(hidden, router_scores)`` (GPT-OSS, Llama-4)."""
    return output[0] if isinstance(output, tuple) else output


def _trained(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _randn(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def _forward_backward(
    fn: Callable[[], torch.Tensor], grad: torch.Tensor, leaves: list[torch.Tensor]
) -> Callable[[], None]:
    def call() -> None:
        for leaf in leaves:
            leaf.grad = None
        fn().reshape(grad.shape).backward(grad)

    return call


def _inference(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def call() -> None:
        with torch.no_grad():
            fn()

    return call


def block_call(
    entry: ArchEntry, block: nn.Module, tokens: int, pass_: Pass, dtype: torch.dtype, device: str, seed: int
) -> TimedCall:
    """The whole block on ``[1, N, H]`` random inputs, its own router deciding (``natural``)."""
    spec = entry.spec
    x = _randn((1, tokens, spec.hidden), dtype, device, seed)
    touched, note = _natural_touched(entry, block, x)
    if pass_ == "fwd":
        return TimedCall(_inference(lambda: _first(block(x))), "block", touched, note)
    x.requires_grad_(True)
    grad = _randn((1, tokens, spec.hidden), dtype, device, seed + 1)
    call = _forward_backward(lambda: _first(block(x)), grad, [x, *_trained(block)])
    return TimedCall(call, "block", touched, note)


def _natural_touched(entry: ArchEntry, block: nn.Module, x: torch.Tensor) -> tuple[int, str]:
    """Experts the block's router picks for ``x`` (one untimed forward, hooks recording the routing)."""
    spec = entry.spec
    with torch.no_grad(), recording(entry, block) as rec:
        block(x)
    index, _ = rec.routing(entry)
    if index is None:
        guess = min(spec.num_experts, x.shape[1] * spec.top_k)
        return guess, f"routing not observable ({entry.routing_from}): bytes assume {guess} touched experts"
    ids = index.reshape(-1)
    return int(torch.unique(ids[ids < spec.num_experts]).numel()), ""


def _weights_dtype(entry: ArchEntry, block: nn.Module, dtype: torch.dtype, device: str) -> torch.dtype:
    """The dtype the block itself passes routing weights to its experts in (a 2-token forward)."""
    x = torch.randn(1, 2, entry.spec.hidden).to(device=device, dtype=dtype)
    with torch.no_grad(), recording(entry, block) as rec:
        block(x)
    _, weights = rec.routing(entry)
    return weights.dtype if isinstance(weights, torch.Tensor) else dtype


def experts_call(
    entry: ArchEntry,
    block: nn.Module,
    routing: Routing,
    tokens: int,
    pass_: Pass,
    dtype: torch.dtype,
    device: str,
    seed: int,
) -> TimedCall:
    """The experts module alone, called with the imposed routing (``uniform``/``zipf``/``hot``/``sparse``)."""
    spec = entry.spec
    experts = block.get_submodule(entry.experts_path)
    weights_dtype = _weights_dtype(entry, block, dtype, device)
    index, weights = imposed_routing(routing, tokens, spec.num_experts, spec.top_k, weights_dtype, device, seed)
    touched = int((expert_loads(routing, tokens, spec.num_experts, spec.top_k, seed) > 0).sum())
    x = _randn((tokens, spec.hidden), dtype, device, seed)
    if pass_ == "fwd":
        return TimedCall(_inference(lambda: experts(x, index, weights)), "experts", touched)
    x.requires_grad_(True)
    weights.requires_grad_(True)
    grad = _randn((tokens, spec.hidden), dtype, device, seed + 1)
    call = _forward_backward(lambda: experts(x, index, weights), grad, [x, weights, *_trained(experts)])
    return TimedCall(call, "experts", touched)
