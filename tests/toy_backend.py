"""An outsider's backend written from scratch against the public Protocol (no transformers).

A dense MoE (every expert on every token, zero weight outside the top-k) for softmax routers with
SwiGLU experts, which also reports a router z-loss and its gradient. ``ToyZLossBackend(z_from_probs=True)``
seeds the bug of computing the z-loss on probabilities, ``z_detached=True`` that of computing it on
detached logits (right value, no gradient to the router).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from moeconf.backends import Observation, RunRequest
from moeconf.registry import REGISTRY, ArchEntry
from moeconf.spec import LossSpec


class ToyZLossBackend:
    devices = ("cpu",)
    dtypes = ("fp32",)

    def __init__(self, z_from_probs: bool = False, z_detached: bool = False) -> None:
        self.name = "toy-zloss-broken" if z_from_probs or z_detached else "toy-zloss"
        self.z_from_probs = z_from_probs
        self.z_detached = z_detached

    def supports(self, entry: ArchEntry, dtype: str, device: str) -> str | None:
        spec = entry.spec
        if spec.router.scoring != "softmax" or spec.experts.glu != "swiglu" or spec.shared is not None:
            return "toy backend: softmax routers with plain SwiGLU experts only"
        return None

    def run(self, request: RunRequest) -> Observation:
        spec = request.entry.spec
        p = {k: v.to(request.dtype).requires_grad_(True) for k, v in request.params.items()}
        x = request.hidden.to(request.dtype).reshape(-1, spec.hidden).requires_grad_(True)
        logits = x @ p["router.weight"].T
        probs = logits.softmax(-1)
        weights, index = probs.topk(spec.top_k, dim=-1)
        if spec.router.renorm == "always":
            weights = weights / weights.sum(-1, keepdim=True)
        dense = torch.zeros_like(probs).scatter(1, index, weights)  # [N, E]
        h = F.silu(torch.einsum("nh,eih->nei", x, p["experts.w_gate"])) * torch.einsum(
            "nh,eih->nei", x, p["experts.w_up"]
        )
        out = torch.einsum("nei,ehi,ne->nh", h, p["experts.w_down"], dense).reshape(request.hidden.shape)
        rows = request.attention_mask.reshape(-1).to(request.dtype)
        z_in = probs if self.z_from_probs else logits
        if self.z_detached:
            z_in = z_in.detach()
        z = (torch.logsumexp(z_in, -1).square() * rows).sum() / rows.sum()
        z_grads: dict[str, torch.Tensor | None] = {"input": None, "router.weight": None}
        if z.requires_grad:  # the z-loss's own gradient, before the output's backward frees the graph
            g_x, g_w = torch.autograd.grad(z, [x, p["router.weight"]], retain_graph=True)
            z_grads = {"input": g_x.reshape(request.hidden.shape), "router.weight": g_w}
        out.backward(request.grad_output.to(request.dtype))
        grads = {k: v.grad for k, v in p.items()}
        grads["input"] = x.grad.reshape(request.hidden.shape)
        return Observation(
            output=out.detach(),
            topk_index=index,
            topk_weights=weights.detach(),
            router_logits=logits.detach(),
            z_loss=z.detach(),
            z_loss_grads=z_grads,
            grads=grads,
        )


toy = ToyZLossBackend()
toy_z_from_probs = ToyZLossBackend(z_from_probs=True)
toy_z_detached = ToyZLossBackend(z_detached=True)

# The Mixtral spec with a z-loss: an architecture only this test suite knows.
TOY_ENTRY = dataclasses.replace(
    REGISTRY["mixtral"],
    model_type="toy_zloss",
    spec=dataclasses.replace(REGISTRY["mixtral"].spec, losses=LossSpec(aux="none", z_loss=True)),
)
