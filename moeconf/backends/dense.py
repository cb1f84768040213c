"""The dense patched block: every expert processes every token, with weight 0 outside the top-k.

NOTE why: a sparse block calls only the experts that received tokens, so on a rank where an expert got
none its parameters get no gradient (``.grad`` None) and ZeRO-2 / FSDP reduce-scatters fall out of
step (DeepSpeed #5066, LLaMA-Factory #9628). Running every expert keeps every parameter in the graph:
unrouted experts get exact-zero gradients and the collectives stay aligned. The routing itself is the
block's own (its router module), so the patched block equals the sparse one in output and in the
gradients of routed experts.

Two forms, chosen from the entry:
- fused experts (transformers 5): the experts module is called as ``experts(hidden, index, weights)``;
  its forward is replaced by a dense computation on canonical views of its parameters (through the
  entry's layouts, so any fused layout works);
- per-expert modules (transformers 4.x): the block's forward is replaced: router → dense weights →
  ``Σ_e w_e · experts[e](x)`` (+ shared experts).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moeconf.params import param_shapes, unqualified
from moeconf.registry.entry import ArchEntry
from moeconf.registry.layouts import LAYOUTS, split_to_canonical
from moeconf.spec import ExpertSpec, MoESpec, RouterSpec

# NOTE: the expert math below is written again on purpose rather than imported from moeconf.reference:
# the dense block is code under test, and a backend that called the reference could never disagree with it.
_ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu2": lambda x: F.relu(x).square(),
}


def dense_reason(entry: ArchEntry) -> str | None:
    """None when the dense patch applies to ``entry``, else why not."""
    spec = entry.spec
    if spec.experts.weight_site != "output" or spec.identity_experts or spec.output_norm_eps is not None:
        return "dense patch covers experts weighted at the output, without identity experts or output norm"
    if any(b.expert is not None for b in entry.params):
        if entry.routing_from == "router_index_weights" or (
            entry.routing_from == "none" and spec.router.scoring == "softmax" and spec.router.select_on == "scores"
        ):
            return None
        return "per-expert block whose routing the dense patch cannot read"
    if entry.routing_from != "experts_call":
        return "routing does not reach the experts as (hidden, top_k_index, top_k_weights)"
    return None


def _dense_weights(index: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[N, k]`` → ``[N, E]`` with zeros outside the top-k (differentiable in ``weights``)."""
    return torch.zeros(index.shape[0], num_experts, dtype=weights.dtype, device=weights.device).scatter(
        1, index.long(), weights
    )


def _all_experts(experts: ExpertSpec, canon: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token: ``x [N, H] → [N, E, H]``."""

    def proj(name: str) -> torch.Tensor:
        y = torch.einsum("nh,eih->nei", x, canon[f"experts.w_{name}"])
        return y + canon[f"experts.b_{name}"] if experts.bias else y

    up, limit, act = proj("up"), experts.gptoss_limit, _ACT[experts.activation]
    if experts.glu == "none":
        hidden = act(up)
    elif experts.glu == "swiglu":
        hidden = act(proj("gate")) * up
    elif experts.glu == "clamped_swiglu":
        hidden = act(proj("gate").clamp(max=limit)) * up.clamp(-limit, limit)
    elif experts.glu == "clamped_after_act":
        hidden = act(proj("gate")).clamp(max=limit) * up.clamp(-limit, limit)
    elif experts.glu == "softcapped_swiglu":
        gate, cg, cu = proj("gate"), experts.softcap_gate, experts.softcap_up
        hidden = cg * torch.tanh(gate / cg) * torch.sigmoid(gate) * cu * torch.tanh(up / cu)
    else:
        gate = proj("gate").clamp(max=limit)
        hidden = (up.clamp(-limit, limit) + 1) * gate * torch.sigmoid(experts.gptoss_alpha * gate)
    out = torch.einsum("nei,ehi->neh", hidden, canon["experts.w_down"])
    return out + canon["experts.b_down"] if experts.bias else out


def _post_expert_norm(spec: MoESpec, canon: dict[str, torch.Tensor], per_expert: torch.Tensor) -> torch.Tensor:
    """A latent MoE's per-expert RMSNorm of ``per_expert [N, E, L]`` before the weights (Muse Spark's
    ``post_expert_norm``, ``spec.LatentSpec``), in float32 as transformers' norms compute; as is otherwise.

    NOTE: the block's own pre/post projections stay in place (only the experts call is patched), but this
    norm sits inside the experts module, so the dense forward must apply it."""
    latent = spec.latent
    if latent is None:
        return per_expert
    scale = (latent.scale_offset + canon["latent.post_norm.weight"]).float()
    y = per_expert.float() * scale if latent.post_norm == "scale_before" else per_expert.float()
    y = y * torch.rsqrt(y.square().mean(dim=-1, keepdim=True) + latent.post_norm_eps)
    y = y * scale if latent.post_norm == "scale_after" else y
    return y.to(per_expert.dtype)


def _patch_fused(block: nn.Module, entry: ArchEntry) -> None:
    # A block with token sets (ERNIE-4.5-VL) has one experts module per set: each is patched alike.
    for token_set in range(entry.num_token_sets):
        _patch_fused_experts(block, entry, entry.set_path(entry.experts_path, token_set))


def _patch_fused_experts(block: nn.Module, entry: ArchEntry, experts_path: str) -> None:
    experts_module = block.get_submodule(experts_path)
    prefix = experts_path + "."
    shapes = param_shapes(entry.spec)
    bindings = [b for b in entry.params if b.path.startswith(prefix)]
    k = entry.spec.top_k

    def forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *_: Any) -> torch.Tensor:
        canon: dict[str, torch.Tensor] = {}
        for b in bindings:
            tensor = experts_module.get_parameter(b.path[len(prefix) :])
            parts = split_to_canonical(LAYOUTS[b.layout], tensor, tuple(shapes[n] for n in b.canonical))
            canon.update(zip(map(unqualified, b.canonical), parts))  # a token set's names, as set 0's
        # NOTE: some experts calls pass [B, S, H] (DBRX), most [N, H]; the routing is per token either way.
        flat = hidden.reshape(-1, hidden.shape[-1])
        per_expert = _post_expert_norm(entry.spec, canon, _all_experts(entry.spec.experts, canon, flat))
        dense = _dense_weights(
            # k named, not -1: a token set may get zero rows, where reshape(0, -1) is ambiguous.
            top_k_index.reshape(flat.shape[0], k),
            top_k_weights.reshape(flat.shape[0], k),
            entry.spec.num_experts,
        )
        out = torch.einsum("ne,neh->nh", dense.to(per_expert.dtype), per_expert).to(hidden.dtype)
        return out.reshape(hidden.shape)

    experts_module.forward = forward


def _softmax_topk(router: RouterSpec, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax → top-k (→ renormalise): the routing of the 4.x per-expert Mixtral/Qwen blocks."""
    weights, index = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
    if router.renorm == "always":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return index, weights * router.routed_scaling


def _patch_per_expert(block: nn.Module, entry: ArchEntry) -> None:
    spec = entry.spec
    router = block.get_submodule(entry.router_path)
    experts = block.get_submodule(entry.experts_path)
    shared = getattr(block, "shared_experts", None) if spec.shared is not None else None

    def forward(hidden: torch.Tensor) -> Any:
        flat = hidden.reshape(-1, hidden.shape[-1])
        routed = router(flat)
        if entry.routing_from == "router_index_weights":
            index, weights = routed[0], routed[1]
            logits = None
        else:
            logits = routed
            index, weights = _softmax_topk(spec.router, logits, spec.top_k)
        dense = _dense_weights(index, weights, spec.num_experts).to(flat.dtype)
        out = sum(dense[:, e : e + 1] * experts[e](flat) for e in range(spec.num_experts))
        if shared is not None:
            out = out + shared(flat)
        out = out.reshape(hidden.shape)
        return out if logits is None else (out, logits)

    block.forward = forward


def apply_dense_patch(block: nn.Module, entry: ArchEntry) -> nn.Module:
    """Patch ``block`` in place (see module docstring); raises ValueError where it does not apply."""
    reason = dense_reason(entry)
    if reason is not None:
        raise ValueError(f"{entry.model_type}: {reason}")
    if any(b.expert is not None for b in entry.params):
        _patch_per_expert(block, entry)
    else:
        _patch_fused(block, entry)
    return block
