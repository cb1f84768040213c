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
``experts.w_gate``          ``[E, I, H]`` gate projection (absent for non-gated experts)
``experts.w_up``            ``[E, I, H]`` up projection
``experts.w_down``          ``[E, H, I]`` down projection
``experts.b_gate/b_up``     ``[E, I]``   expert biases (GPT-OSS)
``experts.b_down``          ``[E, H]``
``shared.w_gate/w_up``      ``[S, H]``   shared expert
``shared.w_down``           ``[H, S]``
``shared.gate``             ``[1, H]``   sigmoid gate of the shared expert (Qwen2-MoE)
``output_norm.weight``      ``[H]``      RMSNorm on the block output (AXK1)
==========================  ===========  ==============================================

The router has ``E + Z`` rows when the spec has ``Z`` identity experts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from moeconf.spec import MoESpec

Params = dict[str, torch.Tensor]

NOT_TRAINED = frozenset({"router.selection_bias"})
"""Buffers or frozen parameters: loaded into the block, never compared as gradients."""


def param_shapes(spec: MoESpec) -> dict[str, tuple[int, ...]]:
    """Every canonical parameter the spec implies, with its shape."""
    E, H, I, R = spec.num_experts, spec.hidden, spec.intermediate, spec.router_width
    shapes: dict[str, tuple[int, ...]] = {"router.weight": (R, H)}
    if spec.router.logit_bias:
        shapes["router.bias"] = (R,)
    if spec.router.selection_bias:
        shapes["router.selection_bias"] = (R,)
    if spec.experts.glu != "none":
        shapes["experts.w_gate"] = (E, I, H)
    shapes["experts.w_up"] = (E, I, H)
    shapes["experts.w_down"] = (E, H, I)
    if spec.experts.bias:
        if spec.experts.glu != "none":
            shapes["experts.b_gate"] = (E, I)
        shapes["experts.b_up"] = (E, I)
        shapes["experts.b_down"] = (E, H)
    if spec.shared is not None:
        S = spec.shared.intermediate
        shapes.update({"shared.w_up": (S, H), "shared.w_down": (H, S)})
        if spec.shared.form.glu != "none":
            shapes["shared.w_gate"] = (S, H)
        if spec.shared.gate == "sigmoid":
            shapes["shared.gate"] = (1, H)
    if spec.output_norm_eps is not None:
        shapes["output_norm.weight"] = (H,)
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
