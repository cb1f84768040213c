"""Canonical MoE parameters: the one naming both the reference and every backend speak.

Backends receive parameters and return gradients under these names, whatever their own layout
(fused gate/up, transposed, interleaved, flattened ...). The registry's parameter bindings translate
between a HF block's tensors and these.

Layout (``nn.Linear`` weight convention, output rows first):

==========================  ===========  ==============================================
name                        shape        meaning
==========================  ===========  ==============================================
``router.weight``           ``[E, H]``   router projection
``router.bias``             ``[E]``      router logit bias (GPT-OSS)
``router.selection_bias``   ``[E]``      bias used for expert *selection* only (DeepSeek-V3)
``router.scale``            ``[1]``      trained scale of every routing weight (Inkling ``global_scale``)
``router.input_norm.weight`` ``[H]``     scale of the router's RMS-normalised input (Gemma 4 ``router.scale``)
``router.expert_scale``     ``[E]``      per-expert scale of the routing weights (Gemma 4 ``per_expert_scale``)
``experts.w_gate``          ``[E, I, H]`` gate projection (absent for non-gated experts)
``experts.w_up``            ``[E, I, H]`` up projection
``experts.w_down``          ``[E, H, I]`` down projection
``experts.b_gate/b_up``     ``[E, I]``   expert biases (GPT-OSS)
``experts.b_down``          ``[E, H]``
``shared.w_gate/w_up``      ``[S, H]``   shared expert
``shared.w_down``           ``[H, S]``
``shared.gate``             ``[1, H]``   sigmoid gate of the shared expert (Qwen2-MoE)
``shared.w_gate/w_up``      ``[n, S, H]`` with ``SharedSpec.gate="router"``: ``n`` shared experts,
``shared.w_down``           ``[n, H, S]`` each weighted by its router slot (Inkling)
``output_norm.weight``      ``[H]``      RMSNorm on the block output (AXK1)
``output.bias``             ``[H]``      learned bias on the block output (JetMoE)
``routed_input_norm.weight``  ``[H]``   RMSNorm of the routed experts' input (Gemma 4 ``pre_feedforward_layernorm_2``)
``routed_output_norm.weight`` ``[H]``   RMSNorm of the routed experts' sum (Gemma 4 ``post_feedforward_layernorm_2``)
``router.*@s``, ``experts.*@s``  as above  token set ``s ≥ 1``'s router and experts, width ``I_s``
                                         (``MoESpec.token_sets``: ERNIE-4.5-VL's vision experts)
``latent.w_pre``            ``[L, H]``   down projection to the experts' latent width (Muse Spark)
``latent.pre_norm.weight``  ``[L]``      RMSNorm of the projected input, scale ``scale_offset + w``
``latent.post_norm.weight`` ``[L]``      RMSNorm of each expert's output, before its routing weight
``latent.w_post``           ``[H, L]``   up projection of the weighted expert sum
==========================  ===========  ==============================================

With ``MoESpec.latent`` the routed experts read and write the latent width ``L`` in place of ``H``:
``experts.w_gate/w_up [E, I, L]``, ``experts.w_down [E, L, I]``, ``experts.b_down [E, L]``.

The router has ``E + Z`` rows when the spec has ``Z`` identity experts, and ``n`` more (``router.weight``,
``router.bias``) with ``RouterSpec.shared_slots = n``; ``router.selection_bias`` covers the ``E + Z``
classes that can be selected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from moeconf.spec import MoESpec

Params = dict[str, torch.Tensor]

SET_QUALIFIER = "@"
"""Separates a canonical name from its token set (``router.weight@1``): a suffix, so that every rule
keyed on the family prefix (``router.``, ``experts.``) applies to every set alike."""


def unqualified(name: str) -> str:
    """The canonical name without its token-set qualifier (``experts.w_up@1`` → ``experts.w_up``)."""
    return name.split(SET_QUALIFIER, 1)[0]


def qualified(name: str, token_set: int) -> str:
    """``name`` in token set ``token_set``; set 0 keeps the plain name."""
    return name if token_set == 0 else f"{name}{SET_QUALIFIER}{token_set}"


class _Untrained(frozenset):
    """Membership ignores the token-set qualifier: ``router.selection_bias@1`` is as frozen as set 0's."""

    def __contains__(self, name: object) -> bool:
        return super().__contains__(unqualified(name) if isinstance(name, str) else name)


NOT_TRAINED = _Untrained({"router.selection_bias"})
"""Buffers or frozen parameters: loaded into the block, never compared as gradients."""

_PER_SET = ("router.", "experts.")
"""Canonical families each token set has its own copy of; the rest (shared, output) serve every token."""


def token_set_spec(spec: MoESpec, token_set: int) -> MoESpec:
    """The plain spec of one token set's routed sub-MoE: its expert width, no further sets."""
    assert spec.token_sets is not None
    return dataclasses.replace(spec, intermediate=spec.token_sets.intermediates[token_set], token_sets=None)


def token_set_params(params: Mapping[str, torch.Tensor], token_set: int) -> Params:
    """The parameters token set ``token_set`` computes with, under plain canonical names: its own
    router/experts (``@s`` names stripped) and the unqualified shared/output ones."""
    own = {
        unqualified(k): v
        for k, v in params.items()
        if k.startswith(_PER_SET) and k == qualified(unqualified(k), token_set)
    }
    common = {k: v for k, v in params.items() if not k.startswith(_PER_SET)}
    return {**common, **own}


def param_shapes(spec: MoESpec) -> dict[str, tuple[int, ...]]:
    """Every canonical parameter the spec implies, with its shape."""
    E, H, I, R = spec.num_experts, spec.hidden, spec.intermediate, spec.router_width
    # NOTE: the shared-expert slots (Inkling) are router rows and logits, never candidates of the selection.
    shapes: dict[str, tuple[int, ...]] = {"router.weight": (spec.router_rows, H)}
    L = spec.expert_width  # the router and shared experts read x [H]; routed experts run at L
    if spec.router.logit_bias:
        shapes["router.bias"] = (spec.router_rows,)
    if spec.router.selection_bias:
        shapes["router.selection_bias"] = (R,)
    if spec.experts.glu != "none":
        shapes["experts.w_gate"] = (E, I, L)
    shapes["experts.w_up"] = (E, I, L)
    shapes["experts.w_down"] = (E, L, I)
    if spec.experts.bias:
        if spec.experts.glu != "none":
            shapes["experts.b_gate"] = (E, I)
        shapes["experts.b_up"] = (E, I)
        shapes["experts.b_down"] = (E, L)
    if spec.latent is not None:
        shapes.update(
            {
                "latent.w_pre": (L, H),
                "latent.pre_norm.weight": (L,),
                "latent.post_norm.weight": (L,),
                "latent.w_post": (H, L),
            }
        )
    if spec.router.learned_scale:
        shapes["router.scale"] = (1,)
    if spec.router.input_norm_eps is not None:
        shapes["router.input_norm.weight"] = (H,)
    if spec.router.expert_scale:
        shapes["router.expert_scale"] = (R,)
    if spec.shared is not None:
        S = spec.shared.intermediate
        # Router-gated shared experts are separate MLPs (one weight each), stacked like routed experts.
        n = (spec.router.shared_slots,) if spec.shared.gate == "router" else ()
        shapes.update({"shared.w_up": (*n, S, H), "shared.w_down": (*n, H, S)})
        if spec.shared.form.glu != "none":
            shapes["shared.w_gate"] = (*n, S, H)
        if spec.shared.gate == "sigmoid":
            shapes["shared.gate"] = (1, H)
    if spec.output_norm_eps is not None:
        shapes["output_norm.weight"] = (H,)
    if spec.output_bias:
        shapes["output.bias"] = (H,)
    if spec.routed_input_norm_eps is not None:
        shapes["routed_input_norm.weight"] = (H,)
    if spec.routed_output_norm_eps is not None:
        shapes["routed_output_norm.weight"] = (H,)
    if spec.token_sets is not None:
        for s in range(1, spec.token_sets.num_sets):
            own = param_shapes(token_set_spec(spec, s))
            shapes.update({qualified(k, s): v for k, v in own.items() if k.startswith(_PER_SET)})
    return shapes


def cast_params(params: Mapping[str, torch.Tensor], dtype: torch.dtype, device: str | torch.device = "cpu") -> Params:
    """Detached copies of ``params`` in ``dtype`` on ``device``."""
    return {k: v.detach().to(device=device, dtype=dtype).clone() for k, v in params.items()}


def round_through(params: Mapping[str, torch.Tensor], dtype: torch.dtype) -> Params:
    """Float64 copies of ``params`` after a round trip through ``dtype``.

    NOTE: the bf16 comparison is made against the reference on the *bf16-rounded* parameters, so the
    only error left is the backend's arithmetic, not the storage rounding of its inputs.
    """
    return {k: v.detach().to(dtype).to(torch.float64) for k, v in params.items()}
