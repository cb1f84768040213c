"""What a pass must compute and move, counted from the spec (never measured).

FLOPs count matrix multiplications only, 2 per multiply-add:

- router: ``2·N·H·R`` (R = router width, including identity experts);
- routed experts: per (token, slot) ``2·H·I`` per projection, 3 projections for gated experts
  (gate, up, down), 2 for non-gated ones (up, down): ``N·k·2·H·I·{3|2}``;
- shared experts: ``N·2·H·S·{3|2}`` plus ``2·N·H`` for a sigmoid shared gate.

Activations, softmax, top-k, biases, the weighted scatter and the optimizer are not counted. Forward and
backward (``fwdbwd``) is 3× the forward: the backward computes the input gradient and the weight
gradient of every matmul, each as costly as the forward one. At the ``experts`` level (the experts call
timed alone, routing imposed) only the routed experts count.

Bytes that must move (the least traffic of a perfect implementation, nothing re-read):

- weights once: every *touched* expert (one that received ≥ 1 token) whole, plus (block level) the
  router and the shared experts;
- activations: the input ``[N, H]`` read and the output ``[N, H]`` written; at the experts level also
  the routing ``[N, k]`` (int64 index + weights);
- backward: the output gradient read, the input gradient written, and one gradient per touched weight
  written (plus the routing weights' gradient at the experts level).

Intermediate activations (``[N·k, I]``) are not counted: a fused kernel need not write them.
Everything is counted at the element width of the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moeconf.spec import MoESpec

Pass = Literal["fwd", "fwdbwd"]
Level = Literal["block", "experts", "step"]
"""What was timed: the whole block, the experts call alone (imposed routing), or a data-parallel training
step of the block on several ranks (counted like a block ``fwdbwd`` per rank)."""

BACKWARD_FACTOR = 2
"""Backward FLOPs per forward FLOP: input gradient + weight gradient of every matmul."""
INDEX_BYTES = 8
"""``top_k_index`` is int64 (what ``torch.topk`` returns)."""


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of one pass over ``N`` tokens, by part."""

    router: int
    routed: int
    shared: int

    @property
    def forward(self) -> int:
        return self.router + self.routed + self.shared


def _projections(glu: str) -> int:
    return 2 if glu == "none" else 3


def expert_params(spec: MoESpec) -> int:
    """Parameters of one routed expert (gate, up, down and their biases)."""
    h, i = spec.hidden, spec.intermediate
    weights = _projections(spec.experts.glu) * h * i
    biases = ((2 if spec.experts.glu != "none" else 1) * i + h) if spec.experts.bias else 0
    return weights + biases


def router_params(spec: MoESpec) -> int:
    r = spec.router_width
    return r * spec.hidden + (r if spec.router.logit_bias else 0)


def shared_params(spec: MoESpec) -> int:
    if spec.shared is None:
        return 0
    gate = spec.hidden if spec.shared.gate == "sigmoid" else 0
    return _projections(spec.shared.form.glu) * spec.hidden * spec.shared.intermediate + gate


def forward_flops(spec: MoESpec, tokens: int, level: Level = "block") -> FlopCount:
    """Forward matmul FLOPs over ``tokens`` tokens (see the module docstring)."""
    h, n = spec.hidden, tokens
    routed = n * spec.top_k * 2 * h * spec.intermediate * _projections(spec.experts.glu)
    if level == "experts":
        return FlopCount(router=0, routed=routed, shared=0)
    router = 2 * n * h * spec.router_width
    shared = 0
    if spec.shared is not None:
        shared = n * 2 * h * spec.shared.intermediate * _projections(spec.shared.form.glu)
        shared += 2 * n * h if spec.shared.gate == "sigmoid" else 0
    return FlopCount(router=router, routed=routed, shared=shared)


def pass_flops(spec: MoESpec, tokens: int, pass_: Pass, level: Level = "block") -> int:
    """FLOPs of the pass: the forward, times 3 with the backward (``step`` is always forward+backward)."""
    forward = forward_flops(spec, tokens, level).forward
    return forward * (1 + BACKWARD_FACTOR) if pass_ == "fwdbwd" or level == "step" else forward


@dataclass(frozen=True)
class ByteCount:
    """Bytes a pass must move, by part."""

    weights: int
    activations: int
    weight_grads: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.weight_grads


def pass_bytes(
    spec: MoESpec, tokens: int, touched_experts: int, pass_: Pass, level: Level, element_bytes: int
) -> ByteCount:
    """Bytes that must move (see the module docstring); ``touched_experts`` received ≥ 1 token."""
    backward = pass_ == "fwdbwd" or level == "step"
    params = touched_experts * expert_params(spec)
    if level != "experts":
        params += router_params(spec) + shared_params(spec)
    tensor = tokens * spec.hidden * element_bytes  # one [N, H] activation
    activations = 2 * tensor
    routing = tokens * spec.top_k * (INDEX_BYTES + element_bytes) if level == "experts" else 0
    activations += routing
    if backward:
        activations += 2 * tensor + (tokens * spec.top_k * element_bytes if level == "experts" else 0)
    weights = params * element_bytes
    return ByteCount(weights=weights, activations=activations, weight_grads=weights if backward else 0)
