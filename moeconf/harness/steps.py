"""The adversarial multi-step case and its single-process reference.

Per step, rank ``r`` gets tokens that route only to its own subset of experts; subsets are disjoint
across ranks, leave some experts idle everywhere, and rotate between steps (so the routing changes
while the optimizer moves the parameters). This is the traffic that made ZeRO-3 ranks fetch
different parameters (DeepSpeed #4808) and left unrouted experts with None grads (DeepSpeed #5066).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeconf.backends.base import StepsRequest, micro_batches
from moeconf.harness.cases import CaseError, draw_params, select_tokens, token_pool
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


STEPS_AUX_COEF = 1.0
STEPS_Z_COEF = 1.0
"""Weights of the aux and z losses in the steps' loss when a backend weighs them. NOTE: 1, not the
configs' 0.001-0.02: at those the router losses' share of the gradient is below the tolerance, and a
mis-scaled term (x world size, x accumulation) would pass unseen."""
STEPS_ACCUMULATION = 2
"""Micro-batches per rank and step when a backend weighs the router losses (gradient accumulation)."""


@dataclass(frozen=True)
class StepsReference:
    outputs: list[list[torch.Tensor]]
    grads: list[dict[str, torch.Tensor]]
    params_after: list[dict[str, torch.Tensor]]
    idle_experts: list[list[int]]
    """``[step]`` experts that no rank routed to: their grads must be exact zeros."""
    losses: list[list[dict[str, list[float]]]]
    """``[step][rank]`` the router losses each rank must put in its loss, per micro-batch
    (``"aux_loss"``/``"z_loss"`` → ``[accumulation]``); empty dicts when the request weighs none."""


def expert_subsets(num_experts: int, world_size: int, step: int, top_k: int = 2) -> list[set[int]]:
    """Per-rank expert subsets that rotate by step, leave experts idle everywhere, and have *different
    sizes* per rank.

    NOTE: unequal sizes matter: ranks that call the same number of experts issue the same number of
    ZeRO-3 parameter all-gathers and stay in step by luck; the hang of DeepSpeed #4808 needs ranks
    whose experts differ in number, as real routing does.

    Disjoint subsets where the experts allow it (2 ranks of 8 experts: 3 and 2 experts). Where they do
    not (4 ranks of 8 experts with top-2 would need 3 + 2 + 2 + 2 > 8), subsets overlap: each rank
    takes a ``top_k``-wide slot aligned to multiples of ``top_k`` (so a slot never straddles an expert
    group that group-limited routing keeps whole), cycling over all slots but the last (which stays
    idle), and rank 0 takes one expert more.
    """
    share = num_experts // world_size
    sizes = [max(share - 1 - r, top_k) for r in range(world_size)]
    if sum(sizes) < num_experts and len(set(sizes)) > 1:
        return [{(r * share + 2 * step + j) % num_experts for j in range(sizes[r])} for r in range(world_size)]
    slots = num_experts // top_k - 1
    if slots < 1 or num_experts < top_k + 2:
        raise ValueError(
            f"{num_experts} experts with top-{top_k} leave no room for unequal per-rank subsets and an idle expert"
        )
    subsets = []
    for r in range(world_size):
        start = (r % slots) * top_k + 2 * step
        size = top_k + 1 if r == 0 else top_k
        subsets.append({(start + j) % num_experts for j in range(size)})
    return subsets


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
    spec: MoESpec,
    params: Params,
    batches: tuple[torch.Tensor, ...],
    grad_outputs: tuple[torch.Tensor, ...],
    accumulation: int,
    coefs: dict[str, float],
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], list[dict[str, list[float]]]]:
    """Per-rank outputs, the gradient of the rank mean of each rank's loss, and each rank's router
    losses per micro-batch. A rank's loss is the micro-batch mean of ``⟨out_m, G_m⟩ + Σ coef·loss_m``."""
    leaves = {k: v.detach().clone().requires_grad_(k not in NOT_TRAINED) for k, v in params.items()}
    outputs, losses, total = [], [], torch.zeros((), dtype=torch.float64)
    for x, g in zip(batches, grad_outputs):
        micro_outputs, seen = [], {name: [] for name in coefs}  # type: ignore[var-annotated]
        for xm, gm in zip(micro_batches(x, accumulation), micro_batches(g, accumulation)):
            result = reference_forward(spec, leaves, xm)
            micro_loss = (result.output * gm).sum()
            for name, coef in coefs.items():
                value = getattr(result, name)
                micro_loss = micro_loss + coef * value
                seen[name].append(float(value.detach()))
            total = total + micro_loss / accumulation
            micro_outputs.append(result.output.detach())
        outputs.append(torch.cat(micro_outputs, dim=1))
        losses.append(seen)
    trained = [k for k in leaves if k not in NOT_TRAINED]
    grads = torch.autograd.grad(total / len(batches), [leaves[k] for k in trained], allow_unused=True)
    return (
        outputs,
        {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(trained, grads)},
        losses,
    )


def router_loss_coefs(spec: MoESpec) -> dict[str, float]:
    """The router losses the spec defines, with the steps' weights."""
    coefs = {}
    if spec.losses.aux != "none":
        coefs["aux_loss"] = STEPS_AUX_COEF
    if spec.losses.z_loss:
        coefs["z_loss"] = STEPS_Z_COEF
    return coefs


def make_steps(
    entry: ArchEntry,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
    world_size: int = 2,
    steps: int = 3,
    tokens_per_rank: int = 6,
    lr: float = 0.1,
    router_losses: bool = False,
) -> tuple[StepsRequest, StepsReference]:
    """The adversarial request and, computed alongside (tokens depend on the parameters of each step),
    its float64 reference: per-rank outputs, averaged grads, SGD parameters after every step.

    ``router_losses``: each rank's loss also weighs the aux and z losses of its own tokens
    (``STEPS_AUX_COEF``/``STEPS_Z_COEF``), over ``STEPS_ACCUMULATION`` micro-batches per step."""
    spec = entry.spec
    coefs = router_loss_coefs(spec) if router_losses else {}
    accumulation = STEPS_ACCUMULATION if router_losses else 1
    gen = torch.Generator().manual_seed(seed + STEPS_SEED_OFFSET)
    params = round_through(draw_params(spec, seed), dtype)
    initial = {k: v.clone() for k, v in params.items()}
    batches, cotangents, ref_out, ref_grads, ref_params, idle, ref_losses = [], [], [], [], [], [], []
    for step in range(steps):
        try:
            subsets = expert_subsets(spec.num_experts, world_size, step, spec.top_k)
        except ValueError as exc:  # a config with k close to E: the steps' routing constraints cannot hold
            raise CaseError(f"adversarial steps: {exc}") from exc
        xs = tuple(
            _rank_tokens(spec, params, subsets[r], tokens_per_rank, dtype, gen).reshape(1, tokens_per_rank, spec.hidden)
            for r in range(world_size)
        )
        gs = tuple(torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype).to(torch.float64) for x in xs)
        used = {int(e) for x in xs for e in route(spec, params, x.reshape(-1, spec.hidden)).index.flatten()}
        outputs, grads, losses = _loss_grads(spec, params, xs, gs, accumulation, coefs)
        params = {k: (v - lr * grads[k] if k in grads else v) for k, v in params.items()}
        batches.append(xs)
        cotangents.append(gs)
        ref_out.append(outputs)
        ref_grads.append(grads)
        ref_params.append({k: v.clone() for k, v in params.items()})
        idle.append(sorted(set(range(spec.num_experts)) - used))
        ref_losses.append(losses)
    request = StepsRequest(
        entry,
        initial,
        tuple(batches),
        tuple(cotangents),
        lr,
        dtype,
        device,
        accumulation=accumulation,
        aux_coef=coefs.get("aux_loss", 0.0),
        z_coef=coefs.get("z_loss", 0.0),
    )
    return request, StepsReference(ref_out, ref_grads, ref_params, idle, ref_losses)
