"""The adversarial multi-step case and its single-process reference.

Per step, rank ``r`` gets tokens that route only to its own subset of experts; subsets are disjoint
across ranks, leave some experts idle everywhere, and rotate between steps (so the routing changes
while the optimizer moves the parameters). This is the traffic that made ZeRO-3 ranks fetch
different parameters (DeepSpeed #4808) and left unrouted experts with None grads (DeepSpeed #5066).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeconf.backends.base import StepsRequest
from moeconf.harness.cases import draw_params, select_tokens, token_pool
from moeconf.params import NOT_TRAINED, Params, round_through
from moeconf.reference import reference_forward, route
from moeconf.registry.entry import ArchEntry
from moeconf.spec import MoESpec

STEPS_SEED_OFFSET = 104729
"""The steps draw from ``seed + STEPS_SEED_OFFSET`` (the 10,000th prime, beyond any case's salt), so
their token stream never coincides with a single-process case's."""
STEPS_POOL = 8192
"""Candidates per rank and step: a token must route *inside* a rank's expert subset, which only a
few percent of random tokens do."""


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


def _rank_tokens(
    spec: MoESpec, params: Params, allowed: set[int], count: int, dtype: torch.dtype, gen: torch.Generator
) -> torch.Tensor:
    """``[count, H]`` tokens that route only to experts in ``allowed``."""
    subset = torch.tensor(sorted(allowed))
    return select_tokens(
        spec,
        params,
        token_pool(spec.hidden, STEPS_POOL, dtype, gen),
        count,
        lambda index: torch.isin(index, subset).all(dim=-1),
        f"adversarial routing inside experts {sorted(allowed)}",
    )


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
    gen = torch.Generator().manual_seed(seed + STEPS_SEED_OFFSET)
    params = round_through(draw_params(spec, seed), dtype)
    initial = {k: v.clone() for k, v in params.items()}
    batches, cotangents, ref_out, ref_grads, ref_params, idle = [], [], [], [], [], []
    for step in range(steps):
        subsets = expert_subsets(spec.num_experts, world_size, step, spec.top_k)
        xs = tuple(
            _rank_tokens(spec, params, subsets[r], tokens_per_rank, dtype, gen).reshape(1, tokens_per_rank, spec.hidden)
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
