"""The MoE spec: architecture-neutral description of one MoE layer.

A spec has no behaviour. The reference (``moeconf.reference``) reads it to compute what a block
*should* produce; the registry pairs one spec with each HF ``model_type``. Every option is a named
``Literal`` field so that one reference serves every router family (see docs/router-families.md for
the families these fields span).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Scoring = Literal["softmax", "sigmoid", "sqrtsoftplus"]
"""How router logits become scores over all experts."""

SelectOn = Literal["scores", "logits"]
"""What top-k ranks: the scores (R1, R3, R4) or the raw logits (R2, Llama-4)."""

WeightFrom = Literal["scores", "softmax_of_selected_logits", "sigmoid_of_selected_logits"]
"""Where the routing weights come from once the k experts are chosen."""

Renorm = Literal["never", "always", "pnorm"]
"""Renormalisation of the k weights: never, divide by their sum (+eps), or by their p-norm."""

GroupScore = Literal["top2sum", "max"]
GroupFill = Literal["-inf", "zero"]

Activation = Literal["silu", "gelu", "gelu_tanh", "relu", "relu2"]
GluForm = Literal["swiglu", "gptoss_clamped", "clamped_swiglu", "clamped_after_act", "softcapped_swiglu", "none"]
"""``swiglu``: act(gate)·up. ``gptoss_clamped``: (clamp(up, ±L)+1)·g·σ(αg) with g = min(gate, L)
(GPT-OSS, MiniMax-M3). ``clamped_swiglu``: act(min(gate, L))·clamp(up, ±L) (DeepSeek-V4, HY-V4,
GLM-5). ``clamped_after_act``: min(act(gate), L)·clamp(up, ±L) (Step3p7). ``softcapped_swiglu``:
cg·tanh(gate/cg)·σ(gate)·cu·tanh(up/cu) (Inkling2). ``none``: act(up)."""

WeightSite = Literal["output", "input"]
"""What the routing weight multiplies: the expert's output (almost everyone) or input (Llama-4)."""

SharedGate = Literal["none", "sigmoid"]
AuxKind = Literal["none", "switch"]


@dataclass(frozen=True)
class GroupLimit:
    """Group-limited top-k (DeepSeek-V2/V3): keep the ``topk_group`` best of ``n_group`` groups."""

    n_group: int
    topk_group: int
    score: GroupScore = "top2sum"
    fill: GroupFill = "-inf"


@dataclass(frozen=True)
class Capacity:
    """Expert capacity (Switch / NLLB): per sequence, in token order, an expert keeps at most
    ``capacity`` (token, slot) assignments; later ones are dropped.

    ``dropped="zero"``: a dropped slot contributes nothing. ``dropped="passthrough"``: a token with
    *every* slot dropped is passed through as ``weight × x`` (Switch's ``next_states = x.clone()``).
    """

    capacity: int
    dropped: Literal["zero", "passthrough"] = "zero"


@dataclass(frozen=True)
class RouterSpec:
    """Router family and options.

    Pipeline (reference/router.py): ``logits = x W^T (+ b)``, ``× logit_multiplier``, optionally
    soft-capped ``c·tanh(ℓ/c)`` → ``scores = scoring(logits)`` → choose k experts by ``select_on``
    (+ ``selection_bias``, optionally group-limited) → weights by ``weight_from`` → ``renorm``
    (divide by ``Σ + renorm_eps``, or by ``max(Σ, renorm_eps)`` when ``renorm_clamp``) →
    ``× routed_scaling`` in the weights (``scaling_site="weights"``) or on the routed output
    (``"output"``). ``output_scale`` multiplies the routed output in addition (OpenAI-PF: weights
    ``/k``, output ``×k``).
    """

    scoring: Scoring = "softmax"
    logit_bias: bool = False
    select_on: SelectOn = "scores"
    selection_bias: bool = False
    weight_from: WeightFrom = "scores"
    renorm: Renorm = "never"
    renorm_eps: float = 0.0
    renorm_clamp: bool = False
    renorm_p: float = 1.0
    logit_softcap: float | None = None
    logit_multiplier: float = 1.0
    group_limit: GroupLimit | None = None
    routed_scaling: float = 1.0
    scaling_site: Literal["weights", "output"] = "weights"
    output_scale: float = 1.0
    capacity: Capacity | None = None


@dataclass(frozen=True)
class ExpertSpec:
    """One routed expert's MLP. Canonical parameters: w_gate/w_up ``[E, I, H]``, w_down ``[E, H, I]``."""

    activation: Activation = "silu"
    glu: GluForm = "swiglu"
    bias: bool = False
    gptoss_alpha: float = 1.702
    gptoss_limit: float = 7.0
    softcap_gate: float = 1.0
    softcap_up: float = 1.0
    weight_site: WeightSite = "output"


@dataclass(frozen=True)
class SharedSpec:
    """Always-on shared expert(s), fused into one MLP of width ``intermediate``.

    ``combine="average"`` returns ``(routed + shared) / 2`` (Cohere2 ``"average"``). ``mlp`` gives the
    shared MLP's form (activation, gating, clamps) with the same vocabulary as the routed experts;
    ``activation`` is kept as a shorthand for the plain SwiGLU case.
    """

    intermediate: int
    gate: SharedGate = "none"
    activation: Activation = "silu"
    combine: Literal["sum", "average"] = "sum"
    mlp: ExpertSpec | None = None

    @property
    def form(self) -> ExpertSpec:
        return self.mlp if self.mlp is not None else ExpertSpec(activation=self.activation)


@dataclass(frozen=True)
class LossSpec:
    """Auxiliary losses the architecture computes (and so the gate checks)."""

    aux: AuxKind = "none"
    z_loss: bool = False


@dataclass(frozen=True)
class MoESpec:
    """A whole MoE layer: sizes, router, experts, shared experts, losses."""

    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    router: RouterSpec = field(default_factory=RouterSpec)
    experts: ExpertSpec = field(default_factory=ExpertSpec)
    shared: SharedSpec | None = None
    losses: LossSpec = field(default_factory=LossSpec)
    identity_experts: int = 0
    """Extra router classes ``E .. E+Z-1`` whose expert is the identity (LongCat "zero-compute" experts)."""
    output_norm_eps: float | None = None
    """RMSNorm (weight ``output_norm.weight [H]``) applied to the block output (AXK1)."""

    @property
    def router_width(self) -> int:
        return self.num_experts + self.identity_experts

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.num_experts + self.identity_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")
        g = self.router.group_limit
        if g is not None and (self.num_experts % g.n_group or not 0 < g.topk_group <= g.n_group):
            raise ValueError(f"group_limit {g} does not divide {self.num_experts} experts")
