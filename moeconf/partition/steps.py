"""The adversarial multi-step case and its single-process reference.

Per step, rank ``r`` gets tokens that route only to its own subset of experts; subsets are disjoint
across ranks, leave some experts idle everywhere, and rotate between steps (so the routing changes
while the optimizer moves the parameters). This is the traffic that made ZeRO-3 ranks fetch
different parameters (DeepSpeed #4808) and left unrouted experts with None grads (DeepSpeed #5066).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeconf.cases import MIN_MARGIN, draw_params
from moeconf.params import NOT_TRAINED, Params, round_through
from moeconf.reference import aux_selection_margin, reference_forward, route
from moeconf.registry.entry import ArchEntry
from moeconf.spec import MoESpec


@dataclass(frozen=True)
class StepsRequest:
    """A multi-step data-parallel run.

    Attributes:
        params: canonical float64 parameters before step 0.
        batches: ``[step][rank]`` block inputs ``[B, S, H]`` (float64).
        grad_outputs: ``[step][rank]`` cotangents; rank ``r`` backpropagates ``⟨out_r, G_r⟩`` and the
            framework averages gradients over ranks.
        lr: plain SGD learning rate (no momentum, no weight decay).
    """

    entry: ArchEntry
    params: Params
    batches: tuple[tuple[torch.Tensor, ...], ...]
    grad_outputs: tuple[tuple[torch.Tensor, ...], ...]
    lr: float
    dtype: torch.dtype
    device: str

    @property
    def world_size(self) -> int:
        return len(self.batches[0])


@dataclass
class StepsObservation:
    """What the ranks saw, per step (``outputs`` per rank; grads/params are the full, gathered ones)."""

    outputs: list[list[torch.Tensor]]
    grads: list[dict[str, torch.Tensor | None]]
    missing_grads: list[tuple[str, ...]]
    params_after: list[dict[str, torch.Tensor | None]]


@dataclass(frozen=True)
class StepsReference:
    outputs: list[list[torch.Tensor]]
    grads: list[dict[str, torch.Tensor]]
    params_after: list[dict[str, torch.Tensor]]
    idle_experts: list[list[int]]
    """``[step]`` experts that no rank routed to: their grads must be exact zeros."""


def expert_subsets(num_experts: int, world_size: int, step: int, top_k: int = 2) -> list[set[int]]:
    """Disjoint per-rank expert subsets that rotate by step, leave experts idle everywhere, and have
    *different sizes* per rank.

    NOTE: unequal sizes matter: ranks that call the same number of experts issue the same number of
    ZeRO-3 parameter all-gathers and stay in step by luck; the hang of DeepSpeed #4808 needs ranks
    whose experts differ in number, as real routing does.
    """
    share = num_experts // world_size
    sizes = [max(share - 1 - r, top_k) for r in range(world_size)]
    return [{(r * share + 2 * step + j) % num_experts for j in range(sizes[r])} for r in range(world_size)]


def _pick_tokens(
    spec: MoESpec, params: Params, allowed: set[int], count: int, dtype: torch.dtype, gen: torch.Generator
) -> torch.Tensor:
    pool = torch.randn(8192, spec.hidden, generator=gen, dtype=torch.float64).to(dtype).to(torch.float64)
    routing = route(spec, params, pool)
    margin = routing.margin
    if spec.losses.aux != "none":
        margin = torch.minimum(margin, aux_selection_margin(routing.logits, spec.top_k))
    inside = torch.isin(routing.index, torch.tensor(sorted(allowed))).all(dim=-1)
    chosen = ((margin >= MIN_MARGIN) & inside).nonzero().flatten()[:count]
    if chosen.numel() < count:
        raise ValueError(
            f"adversarial routing: only {chosen.numel()}/{count} tokens route inside experts {sorted(allowed)}"
        )
    return pool[chosen]


def _loss_grads(
    spec: MoESpec, params: Params, batches: tuple[torch.Tensor, ...], grad_outputs: tuple[torch.Tensor, ...]
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Per-rank outputs and the rank-averaged gradient of ``⟨out_r, G_r⟩``."""
    leaves = {k: v.detach().clone().requires_grad_(k not in NOT_TRAINED) for k, v in params.items()}
    outputs = [reference_forward(spec, leaves, x).output for x in batches]
    loss = sum((out * g).sum() for out, g in zip(outputs, grad_outputs)) / len(batches)
    trained = [k for k in leaves if k not in NOT_TRAINED]
    grads = torch.autograd.grad(loss, [leaves[k] for k in trained], allow_unused=True)
    return [o.detach() for o in outputs], {
        k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(trained, grads)
    }


def make_steps(
    entry: ArchEntry,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
    world_size: int = 2,
    steps: int = 3,
    tokens_per_rank: int = 6,
    lr: float = 0.1,
) -> tuple[StepsRequest, StepsReference]:
    """The adversarial request and, computed alongside (tokens depend on the parameters of each step),
    its float64 reference: per-rank outputs, averaged grads, SGD parameters after every step."""
    spec = entry.spec
    gen = torch.Generator().manual_seed(seed + 104729)
    params = round_through(draw_params(spec, seed), dtype)
    initial = {k: v.clone() for k, v in params.items()}
    batches, cotangents, ref_out, ref_grads, ref_params, idle = [], [], [], [], [], []
    for step in range(steps):
        subsets = expert_subsets(spec.num_experts, world_size, step, spec.top_k)
        xs = tuple(
            _pick_tokens(spec, params, subsets[r], tokens_per_rank, dtype, gen).reshape(1, tokens_per_rank, spec.hidden)
            for r in range(world_size)
        )
        gs = tuple(torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype).to(torch.float64) for x in xs)
        used = {int(e) for x in xs for e in route(spec, params, x.reshape(-1, spec.hidden)).index.flatten()}
        outputs, grads = _loss_grads(spec, params, xs, gs)
        params = {k: (v - lr * grads[k] if k in grads else v) for k, v in params.items()}
        batches.append(xs)
        cotangents.append(gs)
        ref_out.append(outputs)
        ref_grads.append(grads)
        ref_params.append({k: v.clone() for k, v in params.items()})
        idle.append(sorted(set(range(spec.num_experts)) - used))
    request = StepsRequest(entry, initial, tuple(batches), tuple(cotangents), lr, dtype, device)
    return request, StepsReference(ref_out, ref_grads, ref_params, idle)
