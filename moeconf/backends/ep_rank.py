"""What each rank of ``ep-alltoall`` runs: expert parallelism with ``all_to_all_single`` dispatch.

Runs inside ``moeconf.distributed.run_ranks`` (``torch.distributed`` initialised, gloo on CPU).

Per rank ``r`` of ``W``:

* the block is built from the entry and loaded with the case's parameters; then the fused expert
  weights (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) are *replaced* by the rank's own
  slice ``[lo_r, hi_r)`` (``expert_split``): the rank holds no other expert's weight. The router,
  the shared experts and everything else are replicated (data parallel);
* the case's ``N = B·S`` tokens are cut into ``W`` contiguous slices (``token_split``, same rule)
  and rank ``r`` runs the block's own forward (router as shipped) on its slice only;
* the experts call is replaced by ``ep_experts``: sort the ``N_r·k`` (token, slot) rows by expert,
  exchange per-expert counts with an ``all_to_all_single`` (each owner learns how many rows of each
  of its experts every source sends), dispatch the rows with ``all_to_all_single`` (uneven splits),
  run the local experts' SwiGLU, send the results back with the reverse ``all_to_all_single``, and
  combine them at the source with the routing weights;
* backward is autograd through a ``Dispatch`` function whose backward is the reverse all-to-all:
  expert weight gradients land on their owner, the input and router gradients on the token's rank.

Rank 0 gathers everything (outputs, routing, the router/shared gradients all-reduced, every owner's
expert-gradient slice) and returns the whole-batch ``Observation`` the single-process checks judge.

Seeded bugs (``EPJob.bug``, the negative-control backends): ``"wrong-splits"`` cuts the send
buffer at owner boundaries shifted by one expert; ``"no-count-exchange"`` skips the count
all-to-all and assumes every source sends what this rank sends itself (symmetric traffic);
``"no-unpermute"`` returns the expert results in expert order instead of arrival order (silent:
no collective notices, only the numbers are wrong; used by the tests, not registered).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moeconf.backends.base import Observation, RunRequest, StepObservation, StepsRequest
from moeconf.backends.hf import recorded_router_logits
from moeconf.hf.block import (
    build_block,
    cast_like_from_pretrained,
    framework_losses,
    load_params,
    recording,
    to_canonical,
    trained_tensors,
)
from moeconf.params import Params
from moeconf.registry.entry import ArchEntry

Bug = Literal["wrong-splits", "no-count-exchange", "no-unpermute"]
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def expert_split(num_experts: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` expert ranges per rank: ``E // W`` each, the first ``E % W`` ranks one
    more (E=6, W=4 → 2, 2, 1, 1). A rank may own none when ``E < W``."""
    base, extra = divmod(num_experts, world_size)
    bounds, lo = [], 0
    for r in range(world_size):
        hi = lo + base + (1 if r < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


token_split = expert_split
"""Tokens are cut by the same rule: rank ``r`` runs flat tokens ``[lo, hi)`` of the case (a rank may get none)."""


@dataclass(frozen=True)
class EPJob:
    """Everything a rank needs (picklable)."""

    entry: ArchEntry
    dtype: torch.dtype
    cases: tuple[RunRequest, ...]
    steps: StepsRequest | None
    bug: Bug | None = None


# --------------------------------------------------------------------------
# the communication


def _wire(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 rows travel as bytes (bit-exact; gloo's all-to-all takes neither bf16 nor int16):
    a ``[M, H]`` view as ``[M, 2H]`` uint8, still split by rows."""
    return t.view(torch.uint8) if t.dtype in (torch.bfloat16, torch.float16) else t


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
    """Rows ``x [sum(in_splits), ...]`` → ``[sum(out_splits), ...]``: ``in_splits[r]`` rows go to rank r,
    ``out_splits[s]`` rows arrive from rank s, in rank order."""
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(_wire(out), _wire(x), out_splits, in_splits)
    return out


class Dispatch(torch.autograd.Function):
    """``all_to_all`` whose backward is the reverse ``all_to_all`` (splits swapped)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.splits = (out_splits, in_splits)
        return all_to_all(x, out_splits, in_splits)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        return all_to_all(grad, in_splits, out_splits), None, None


# --------------------------------------------------------------------------
# the experts


@dataclass
class Traffic:
    """What the last forward sent and received (for the tests: idle ranks and experts)."""

    sent: list[int]
    received: list[int]


def ep_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    bounds: list[tuple[int, int]],
    bug: Bug | None = None,
    traffic: list[Traffic] | None = None,
) -> torch.Tensor:
    """``hidden [N, H]``, ``top_k_index/weights [N, k]`` (this rank's tokens), local weights
    ``gate_up_proj [n_local, 2I, H]``, ``down_proj [n_local, H, I]`` → ``[N, H]``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    num_experts = bounds[-1][1]
    lo, hi = bounds[rank]
    n_local = hi - lo
    n, k = top_k_index.shape
    flat = top_k_index.reshape(-1).long()
    order = torch.argsort(flat, stable=True)  # rows grouped by expert, hence by owner rank
    counts = torch.bincount(flat, minlength=num_experts)

    # 1. counts: owner r learns, per source s, how many rows of each of its experts s sends.
    owners = [h - l for l, h in bounds]
    if bug == "no-count-exchange":
        received = counts[lo:hi].repeat(world)  # assumes every source sends what this rank sends itself
    else:
        received = all_to_all(counts, [n_local] * world, owners)
    received = received.view(world, n_local)
    cuts = (
        bounds
        if bug != "wrong-splits"
        else [(max(l - 1, 0), h - 1 if r < world - 1 else h) for r, (l, h) in enumerate(bounds)]
    )
    in_splits = [int(counts[l:h].sum()) for l, h in cuts]
    out_splits = [int(c) for c in received.sum(1)]
    if traffic is not None:
        traffic.append(Traffic(in_splits, out_splits))

    # 2. dispatch: rows arrive as [source][local expert][row].
    rows = Dispatch.apply(hidden.index_select(0, order // k), out_splits, in_splits)

    # 3. local experts: regroup by expert (stable: source order kept), SwiGLU, back to arrival order.
    expert_of_row = torch.repeat_interleave(torch.arange(n_local).repeat(world), received.reshape(-1))
    perm = torch.argsort(expert_of_row, stable=True)
    grouped = rows.index_select(0, perm)
    per_expert = torch.bincount(expert_of_row, minlength=n_local).tolist()
    outs, start = [], 0
    for j, count in enumerate(per_expert):  # every local expert, also with 0 rows: its grads are exact zeros
        x = grouped[start : start + count]
        gate, up = F.linear(x, gate_up_proj[j]).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(gate) * up, down_proj[j]))
        start += count
    done = torch.cat(outs) if outs else grouped.new_zeros((0, down_proj.shape[1]))
    if bug != "no-unpermute":
        done = done.index_select(0, torch.argsort(perm))

    # 4. combine: reverse all-to-all, then Σ_slot w·row at the source (fp32, rounded once).
    back = Dispatch.apply(done, in_splits, out_splits)
    weights = top_k_weights.reshape(-1).index_select(0, order).unsqueeze(1)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    out = torch.zeros(n, hidden.shape[1], dtype=acc, device=hidden.device)
    return out.index_add(0, order // k, back.to(acc) * weights.to(acc)).to(hidden.dtype)


# --------------------------------------------------------------------------
# the block on this rank


@dataclass
class EPBlock:
    block: nn.Module
    bounds: list[tuple[int, int]]
    traffic: list[Traffic]

    def expert_paths(self, entry: ArchEntry) -> set[str]:
        return {f"{entry.experts_path}.{name}" for name in EXPERT_WEIGHTS}


def build_ep_block(job: EPJob, params: Params) -> EPBlock:
    entry = job.entry
    block = build_block(entry, "eager" if "eager" in entry.experts_implementations else None)
    load_params(entry, block, params)
    block = cast_like_from_pretrained(entry, block, job.dtype).train(entry.train_mode)
    experts = block.get_submodule(entry.experts_path)
    bounds = expert_split(entry.spec.num_experts, dist.get_world_size())
    lo, hi = bounds[dist.get_rank()]
    for name in EXPERT_WEIGHTS:  # this rank keeps only its own experts' weights
        setattr(experts, name, nn.Parameter(getattr(experts, name).detach()[lo:hi].clone()))
    traffic: list[Traffic] = []

    def forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *_: Any) -> torch.Tensor:
        gate_up, down = getattr(experts, "gate_up_proj"), getattr(experts, "down_proj")  # noqa: B009 - typed Any
        return ep_experts(hidden, top_k_index, top_k_weights, gate_up, down, bounds, job.bug, traffic)

    experts.forward = forward
    return EPBlock(block, bounds, traffic)


def _local_tokens(x: torch.Tensor, hidden: int) -> torch.Tensor:
    lo, hi = token_split(x.numel() // hidden, dist.get_world_size())[dist.get_rank()]
    return x.reshape(-1, hidden)[lo:hi]


def _gathered_grads(
    job: EPJob, ep: EPBlock, scale: float = 1.0
) -> tuple[dict[str, torch.Tensor | None], dict[str, torch.Tensor | None], tuple[str, ...]]:
    """``(full grads by binding path, local grads by path (reduced where replicated), missing)``:
    replicated parameters' grads summed over ranks (``all_reduce``), every owner's expert slice
    gathered (``all_gather_object``) and concatenated in rank order."""
    tensors = trained_tensors(job.entry, ep.block)
    experts = ep.expert_paths(job.entry)
    full: dict[str, torch.Tensor | None] = {}
    local: dict[str, torch.Tensor | None] = {}
    for path, p in tensors.items():
        if path in experts:
            continue
        had = torch.tensor([p.grad is not None], dtype=torch.int64)
        grad = (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float() * scale
        dist.all_reduce(grad)
        dist.all_reduce(had)
        local[path] = full[path] = grad if int(had) else None
    mine = {
        path: (g.detach().float() * scale if (g := tensors[path].grad) is not None else None)
        for path in experts
        if path in tensors
    }
    local.update(mine)
    slices: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(slices, mine)
    missing: list[str] = []
    for path in mine:
        parts = []
        for r, (lo, hi) in enumerate(ep.bounds):
            part = slices[r][path]
            if part is None:
                shape = tensors[path].shape[1:]
                part = torch.zeros((hi - lo, *shape))
                missing += [f"{path}[{e}]" for e in range(lo, hi)]
            parts.append(part)
        full[path] = torch.cat(parts)
    canonical, per_expert_missing = to_canonical(job.entry, full)
    return canonical, local, tuple(missing) + per_expert_missing


def _gathered_params(job: EPJob, ep: EPBlock) -> dict[str, torch.Tensor | None]:
    tensors = trained_tensors(job.entry, ep.block)
    experts = ep.expert_paths(job.entry)
    mine = {path: tensors[path].detach().float() for path in experts if path in tensors}
    slices: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(slices, mine)
    # NOTE: clone: .float() of an fp32 parameter is the parameter itself, which the next step changes
    full: dict[str, torch.Tensor | None] = {
        p: t.detach().float().clone() for p, t in tensors.items() if p not in experts
    }
    full.update({path: torch.cat([s[path] for s in slices]) for path in mine})
    return to_canonical(job.entry, full)[0]


def _gather_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's rows of a per-token tensor, concatenated over ranks in rank order."""
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, None if t is None else t.detach().cpu())
    if any(p is None for p in parts):
        return None
    return torch.cat(parts)


def run_case(job: EPJob, case: RunRequest) -> tuple[Observation, list[Traffic]]:
    """One case: rank r runs its token slice; every rank returns the whole batch's observation
    (rank 0's is used) and what this rank sent and received per forward."""
    entry, h = job.entry, job.entry.spec.hidden
    ep = build_ep_block(job, case.params)
    x = _local_tokens(case.hidden, h).to(job.dtype).reshape(1, -1, h).requires_grad_(True)
    with recording(entry, ep.block) as rec:
        out = ep.block(x)
        out = (out[0] if isinstance(out, tuple) else out).reshape(x.shape)
    out.backward(_local_tokens(case.grad_output, h).to(job.dtype).reshape(x.shape))
    grads, _, missing = _gathered_grads(job, ep)
    index, weights = rec.routing(entry)
    grad_input = _gather_rows(x.grad.reshape(-1, h) if x.grad is not None else torch.zeros(0, h, dtype=job.dtype))
    grads["input"] = grad_input.reshape(case.hidden.shape) if grad_input is not None else None
    output = _gather_rows(out.detach().reshape(-1, h))
    assert output is not None
    aux, z = _global_router_losses(entry, rec, case.attention_mask)
    obs = Observation(
        output=output.reshape(case.hidden.shape),
        topk_index=_gather_rows(index),
        topk_weights=_gather_rows(weights),
        router_logits=_gather_rows(rec.router_logits(entry)),
        aux_loss=aux,
        z_loss=z,
        recorded_router_logits=rec.recorded_count,
        grads=grads,
        missing_grads=missing,
    )  # the losses' gradients are not reported (see docs/expert-parallel.md): grad_aux_loss skips
    return obs, ep.traffic


def _global_router_losses(
    entry: ArchEntry, rec: Any, attention_mask: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The aux and z losses of the *whole* batch, by the model's own loss functions, from every rank's
    recorded router logits gathered in token order: the statistics (tokens per expert, mean router
    probability) are global, as Megatron's and DeepSpeed-MoE's expert-parallel aux losses are,
    not each rank's slice's. Values only (detached)."""
    local = recorded_router_logits(entry, rec)
    gathered = [_gather_rows(t.reshape(-1, t.shape[-1])) for t in local]
    if not gathered or any(t is None for t in gathered):
        return None, None
    aux, z = framework_losses(entry, [t for t in gathered if t is not None], attention_mask)
    return (None if aux is None else aux.detach()), (None if z is None else z.detach())


def run_steps(job: EPJob, steps: StepsRequest) -> tuple[list[StepObservation], list[list[torch.Tensor]]]:
    """The adversarial steps: per step the batches of every data-parallel replica are concatenated
    and cut into ``W`` token slices; loss ``Σ_b ⟨out_b, G_b⟩ / B`` (the reference's average over
    the ``B`` replicas); replicated grads all-reduced, expert grads stay with their owner; plain SGD.
    Returns this rank's step observations and every replica's output per step."""
    h = job.entry.spec.hidden
    ep = build_ep_block(job, steps.params)
    replicas = steps.world_size
    tensors = trained_tensors(job.entry, ep.block)
    seen, outputs = [], []
    for batch, grad_output in zip(steps.batches, steps.grad_outputs):
        sizes = [b.numel() // h for b in batch]
        x = _local_tokens(torch.cat([b.reshape(-1, h) for b in batch]), h).to(job.dtype).reshape(1, -1, h)
        g = _local_tokens(torch.cat([b.reshape(-1, h) for b in grad_output]), h).to(job.dtype).reshape(x.shape)
        out = ep.block(x)
        out = (out[0] if isinstance(out, tuple) else out).reshape(x.shape)
        out.backward(g)
        grads, local, missing = _gathered_grads(job, ep, scale=1.0 / replicas)
        with torch.no_grad():
            for path, p in tensors.items():
                if local.get(path) is not None:
                    p.sub_(steps.lr * local[path].to(p.dtype))  # type: ignore[union-attr]
                p.grad = None
        whole = _gather_rows(out.detach().reshape(-1, h))
        assert whole is not None
        outputs.append([part.reshape(b.shape) for part, b in zip(whole.split(sizes), batch)])
        seen.append(StepObservation(out.detach(), grads, missing, _gathered_params(job, ep)))
    return seen, outputs


@dataclass
class EPResult:
    """What one rank returns (picklable)."""

    rank: int
    cases: list[Observation]
    traffic: list[list[Traffic]]
    """``[case]`` this rank's sends/receives per forward."""
    steps: list[StepObservation] | None
    steps_outputs: list[list[torch.Tensor]] | None
    """``[step][replica]`` the gathered outputs."""


def run_ep_job(job: EPJob) -> EPResult:
    """The rank function given to ``run_ranks``."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.manual_seed(0)
    cases, traffic = [], []
    for case in job.cases:  # NOTE: a case's own entry: a test may check several archs in one launch
        obs, seen = run_case(dataclasses.replace(job, entry=case.entry), case)
        cases.append(obs)
        traffic.append(seen)
    steps, outputs = (
        run_steps(dataclasses.replace(job, entry=job.steps.entry), job.steps) if job.steps is not None else (None, None)
    )
    return EPResult(dist.get_rank(), cases, traffic, steps, outputs)
