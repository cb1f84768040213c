"""Reference MoE block: experts, shared experts, output and losses, in float64.

``reference_forward`` is the spec of a block: for tokens ``x [B, S, H]`` it returns routing, output
and losses; gradients come from autograd on it (``reference_gradients``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeconf.params import NOT_TRAINED, Params, token_set_params, token_set_spec
from moeconf.reference.losses import load_balancing_loss, router_z_loss
from moeconf.reference.router import Routing, route_tokens, token_sets_of
from moeconf.spec import Activation, ExpertSpec, LatentNorm, MoESpec


def activation(name: Activation, x: torch.Tensor) -> torch.Tensor:
    """The activations the spec names."""
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    return F.relu(x).square()  # relu2 (NemotronH)


def gated_mlp(form: ExpertSpec, proj: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The hidden activation of one MLP given its projections ``proj("gate" | "up")``."""
    up = proj("up")
    limit = form.gptoss_limit
    if form.glu == "none":
        return activation(form.activation, up)
    gate = proj("gate")
    if form.glu == "swiglu":
        return activation(form.activation, gate) * up
    if form.glu == "clamped_swiglu":
        return activation(form.activation, gate.clamp(max=limit)) * up.clamp(-limit, limit)
    if form.glu == "clamped_after_act":
        return activation(form.activation, gate).clamp(max=limit) * up.clamp(-limit, limit)
    if form.glu == "softcapped_swiglu":
        cg, cu = form.softcap_gate, form.softcap_up
        return cg * torch.tanh(gate / cg) * torch.sigmoid(gate) * cu * torch.tanh(up / cu)
    # GPT-OSS: clamp gate from above, up both ways, then (up + 1)·g·σ(αg)
    gate = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * gate * torch.sigmoid(form.gptoss_alpha * gate)


def expert_mlp(experts: ExpertSpec, params: Params, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` applied to ``x [n, H] → [n, H]``."""
    bias = experts.bias

    def proj(name: str) -> torch.Tensor:
        return F.linear(x, params[f"experts.w_{name}"][e], params[f"experts.b_{name}"][e] if bias else None)

    return F.linear(
        gated_mlp(experts, proj), params["experts.w_down"][e], params["experts.b_down"][e] if bias else None
    )


def shared_mlp(
    spec: MoESpec, params: Params, x: torch.Tensor, slot_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Shared expert(s) ``[N, H] → [N, H]``, gated if the spec says so.

    ``gate="router"`` (Inkling): ``Σ_j slot_weights[:, j] · MLP_j(x)`` over the ``n`` stacked shared experts,
    ``slot_weights [N, n]`` being the router's shared-slot weights (``Routing.shared_weights``).
    """
    assert spec.shared is not None
    if spec.shared.gate == "router":
        assert slot_weights is not None, "router-gated shared experts need the router's shared-slot weights"
        out = torch.zeros_like(x)
        for j in range(slot_weights.shape[-1]):
            hidden = gated_mlp(spec.shared.form, lambda name, j=j: F.linear(x, params[f"shared.w_{name}"][j]))
            out = out + slot_weights[:, j : j + 1] * F.linear(hidden, params["shared.w_down"][j])
        return out
    hidden = gated_mlp(spec.shared.form, lambda name: F.linear(x, params[f"shared.w_{name}"]))
    out = F.linear(hidden, params["shared.w_down"])
    if spec.shared.gate == "sigmoid":
        out = torch.sigmoid(F.linear(x, params["shared.gate"])) * out
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)


def latent_norm(form: LatentNorm, x: torch.Tensor, weight: torch.Tensor, offset: float, eps: float) -> torch.Tensor:
    """A latent MoE's RMSNorm of ``x [n, L]`` with scale ``offset + weight``, applied after the
    normalisation (``scale_after``) or to the input before it (``scale_before``, spec.LatentNorm)."""
    scale = offset + weight
    if form == "scale_before":
        return rms_norm(scale * x, torch.ones_like(weight), eps)
    return rms_norm(x, scale, eps)


def latent_input(spec: MoESpec, params: Params, x: torch.Tensor) -> torch.Tensor:
    """What the routed experts read: ``x [N, H]`` itself, or for a latent MoE ``norm_pre(x P_preᵀ) [N, L]``."""
    latent = spec.latent
    if latent is None:
        return x
    z = F.linear(x, params["latent.w_pre"])
    return latent_norm(latent.pre_norm, z, params["latent.pre_norm.weight"], latent.scale_offset, latent.pre_norm_eps)


def post_expert(spec: MoESpec, params: Params, y: torch.Tensor) -> torch.Tensor:
    """One expert's output ``y [n, L]`` as it enters the weighted sum: per-expert normed for a latent MoE."""
    latent = spec.latent
    if latent is None:
        return y
    return latent_norm(
        latent.post_norm, y, params["latent.post_norm.weight"], latent.scale_offset, latent.post_norm_eps
    )


def latent_output(spec: MoESpec, params: Params, routed: torch.Tensor) -> torch.Tensor:
    """The routed sum back at the hidden width: ``routed [N, L] P_postᵀ`` for a latent MoE, else as is."""
    return routed if spec.latent is None else F.linear(routed, params["latent.w_post"])


def routed_output(spec: MoESpec, params: Params, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Σ over selected (and kept) slots of weight × expert, ``[N, H]`` (``[N, L]`` for a latent MoE: ``x`` is
    then ``latent_input``'s, and each expert's output is ``post_expert``-normed before its weight).

    Loops over experts the plain way: the reference is read, not raced. Router classes past the
    routed experts (``identity_experts``) return their input.
    """
    out = torch.zeros_like(x)
    weights = routing.weights * routing.kept
    identity = (routing.index >= spec.num_experts) & routing.kept
    if identity.any():
        out = out + (weights * identity).sum(dim=-1, keepdim=True) * x
    for e in range(spec.num_experts):
        token, slot = torch.where((routing.index == e) & routing.kept)
        if token.numel() == 0:
            continue
        w = weights[token, slot].unsqueeze(-1)
        if spec.experts.weight_site == "input":  # Llama-4 scales what goes *into* the expert
            y = expert_mlp(spec.experts, params, e, w * x[token])
        else:
            y = w * post_expert(spec, params, expert_mlp(spec.experts, params, e, x[token]))
        out = out.index_add(0, token, y)
    if spec.router.capacity is not None and spec.router.capacity.dropped == "passthrough":
        dropped = ~routing.kept.any(dim=-1)
        out = out + dropped.unsqueeze(-1) * routing.weights.sum(dim=-1, keepdim=True) * x
    if spec.router.scaling_site == "output":
        out = out * spec.router.routed_scaling
    return out * spec.router.output_scale


def routed_output_by_set(
    spec: MoESpec, params: Params, x: torch.Tensor, routing: Routing, token_types: torch.Tensor | None
) -> torch.Tensor:
    """``routed_output`` where each token ``[N, H]`` is computed by its own token set's experts
    (``spec.token_sets``) with its row of ``routing``; ``routed_output`` without token sets."""
    if spec.token_sets is None:
        return routed_output(spec, params, x, routing)
    sets = token_sets_of(spec, token_types, x.shape[0]).to(x.device)
    out = torch.zeros_like(x)
    for s in range(spec.token_sets.num_sets):
        rows = (sets == s).nonzero().flatten()
        if rows.numel() == 0:
            continue
        part = Routing(*(getattr(routing, f)[rows] for f in ("logits", "index", "weights", "margin", "kept")))
        out = out.index_add(0, rows, routed_output(token_set_spec(spec, s), token_set_params(params, s), x[rows], part))
    return out


@dataclass(frozen=True)
class ReferenceResult:
    """Everything the reference says a block computes for one batch.

    Attributes:
        routing: the reference routing of the ``N = B·S`` flattened tokens.
        output: ``[B, S, H]``.
        aux_loss: Switch/GShard load-balancing loss over non-padded tokens (None if the spec has none).
        z_loss: router z-loss (None if the spec has none).
    """

    routing: Routing
    output: torch.Tensor
    aux_loss: torch.Tensor | None
    z_loss: torch.Tensor | None


def reference_forward(
    spec: MoESpec,
    params: Params,
    x: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    token_types: torch.Tensor | None = None,
) -> ReferenceResult:
    """The reference block on ``x [B, S, H]`` (float64 expected); ``attention_mask [B, S]`` only
    affects the losses (padded rows are excluded from the load-balancing statistics);
    ``token_types [B, S]`` chooses each token's expert set (``spec.token_sets``; None: type 0)."""
    b, s, h = x.shape
    flat = x.reshape(b * s, h)
    routing = route_tokens(spec, params, flat, token_types, tokens_per_sequence=s)
    experts_in = latent_input(spec, params, flat)
    if spec.routed_input_norm_eps is not None:  # Gemma 4: the routed experts read a normed x, the router x itself
        experts_in = rms_norm(experts_in, params["routed_input_norm.weight"], spec.routed_input_norm_eps)
    routed = routed_output_by_set(spec, params, experts_in, routing, token_types)
    out = latent_output(spec, params, routed)
    if spec.routed_output_norm_eps is not None:  # normed before the shared experts join (Gemma 4)
        out = rms_norm(out, params["routed_output_norm.weight"], spec.routed_output_norm_eps)
    if spec.shared is not None:
        out = out + shared_mlp(spec, params, flat, routing.shared_weights)
        if spec.shared.combine == "average":
            out = out / 2
    if spec.output_bias:
        out = out + params["output.bias"]
    if spec.output_norm_eps is not None:
        out = rms_norm(out, params["output_norm.weight"], spec.output_norm_eps)
    aux, z = router_losses(spec, routing.logits, attention_mask, s)
    return ReferenceResult(routing=routing, output=out.reshape(b, s, h), aux_loss=aux, z_loss=z)


def router_losses(
    spec: MoESpec, logits: torch.Tensor, attention_mask: torch.Tensor | None, tokens_per_sequence: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(aux_loss, z_loss)`` of the spec from the router logits ``[B·S, E]`` (None where it has no such
    loss), over the rows and groups ``spec.losses`` names."""
    losses = spec.losses
    mask = attention_mask if losses.padding == "excluded" else None
    group = tokens_per_sequence if losses.aux_group == "sequence" else None
    aux = load_balancing_loss(logits, spec.top_k, mask, group) if losses.aux == "switch" else None
    z = router_z_loss(logits, mask) if losses.z_loss else None
    return aux, z


def reference_gradients(
    spec: MoESpec, params: Params, x: torch.Tensor, grad_output: torch.Tensor, token_types: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Gradients of ``⟨output, grad_output⟩`` w.r.t. the input (``"input"``) and every trained parameter."""
    leaves = {k: v.detach().clone().requires_grad_(k not in NOT_TRAINED) for k, v in params.items()}
    x = x.detach().clone().requires_grad_(True)
    out = reference_forward(spec, leaves, x, token_types=token_types).output
    trained = [k for k in leaves if k not in NOT_TRAINED]
    grads = torch.autograd.grad(out, [x] + [leaves[k] for k in trained], grad_output, allow_unused=True)
    result = {"input": grads[0]}
    for name, grad in zip(trained, grads[1:]):
        result[name] = grad if grad is not None else torch.zeros_like(leaves[name])
    return result


def reference_loss_gradients(
    spec: MoESpec,
    params: Params,
    x: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    token_types: torch.Tensor | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Gradients of each router loss of the spec (``"aux_loss"``, ``"z_loss"``) w.r.t. the input
    (``"input"``) and the router's trained parameters: what training the router with that loss means.

    Only the router enters the losses, so only it is run. The aux loss's top-k counts ``f_e`` carry
    no gradient (a selection); its mean probabilities ``P_e`` do (``load_balancing_loss``).
    """
    losses = {"aux_loss": spec.losses.aux == "switch", "z_loss": spec.losses.z_loss}
    if not any(losses.values()):
        return {}
    trained = [k for k in params if k.startswith("router.") and k not in NOT_TRAINED]
    leaves = {k: v.detach().clone().requires_grad_(k in trained) for k, v in params.items()}
    x = x.detach().clone().requires_grad_(True)
    b, s, h = x.shape
    logits = route_tokens(spec, leaves, x.reshape(b * s, h), token_types, tokens_per_sequence=s).logits
    aux, z = router_losses(spec, logits, attention_mask, s)
    result = {}
    for name, loss in (("aux_loss", aux), ("z_loss", z)):
        if loss is None:
            continue
        grads = torch.autograd.grad(loss, [x] + [leaves[k] for k in trained], retain_graph=True, allow_unused=True)
        result[name] = {
            name_: grad if grad is not None else torch.zeros_like(leaf)
            for name_, grad, leaf in zip(["input", *trained], grads, [x] + [leaves[k] for k in trained])
        }
    return result
