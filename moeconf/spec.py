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

WeightFrom = Literal["scores", "softmax_of_selected_logits", "sigmoid_of_selected_logits", "sparsemixer"]
"""Where the routing weights come from once the k experts are chosen. ``sparsemixer`` (PhiMoE, R8): pick
``j`` (in rank order) gets ``softmax(ℓ')[pick j]``, where ``ℓ'`` is ℓ with the earlier picks at −inf and
every logit with ``(m_j − ℓ_i) / max(|ℓ_i|, m_j) > 2·sparsemixer_eps`` at −inf (``m_j``: the pick's logit);
see docs/router-families.md, 'SparseMixer'."""

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

SharedGate = Literal["none", "sigmoid", "router"]
"""How the shared expert(s) are gated: not at all, by ``σ(x·g)`` (Qwen2-MoE), or each by its own router slot's
weight (``"router"``, Inkling: ``RouterSpec.shared_slots``)."""
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
    """Expert capacity (Switch / NLLB): within each group of tokens, in priority order, an expert keeps
    at most ``capacity`` (token, slot) assignments; later ones are dropped.

    ``group``: the tokens that share the capacity: each sequence (``"sequence"``: Switch routes
    ``[B, S, H]`` and counts along S) or the whole batch (``"batch"``: NLLB flattens first).
    ``order``: the priority: token by token, each token's slots together (``"token"``), or every
    token's first choice before any second choice (``"slot"``: GShard / fairseq Top2Gate, NLLB).
    ``renorm_kept``: after dropping, each token's weights are divided by the sum over its *kept*
    slots, so a dropped slot weighs 0 (fairseq's ``normalize_gate_prob_before_dropping=False``).
    ``dropped="zero"``: a dropped slot contributes nothing. ``dropped="passthrough"``: a token with
    *every* slot dropped is passed through as ``weight × x`` (Switch in transformers 4.x:
    ``next_states = x.clone()``).
    """

    capacity: int
    dropped: Literal["zero", "passthrough"] = "zero"
    group: Literal["sequence", "batch"] = "sequence"
    order: Literal["token", "slot"] = "token"
    renorm_kept: bool = False


LatentNorm = Literal["scale_after", "scale_before"]
"""Where a latent MoE's RMSNorm applies its scale ``s = scale_offset + w``: ``scale_after``:
``s ⊙ z / rms(z)`` (the usual RMSNorm); ``scale_before``: ``u / rms(u)`` with ``u = s ⊙ z``, so the
scale only reweights the coordinates before the norm removes the magnitude (Muse Spark's
``MuseSparkTextInputScaledRMSNorm``). ``rms(z) = sqrt(mean(z²) + eps)``."""


@dataclass(frozen=True)
class LatentSpec:
    """Latent MoE (Muse Spark): the routed experts run at a width ``L`` other than the hidden size.

    For tokens ``x [N, H]``: the router reads ``x`` itself; the experts see ``z = norm_pre(x P_preᵀ)``
    ``[N, L]``; each expert's output is normed before its routing weight multiplies it, and the sum is
    projected back: ``out = (Σ_i w_i · norm_post(E_i(z))) P_postᵀ`` ``[N, H]``. Canonical parameters
    ``latent.w_pre [L, H]``, ``latent.pre_norm.weight [L]``, ``latent.post_norm.weight [L]``,
    ``latent.w_post [H, L]``; the experts' own weights are ``[E, I, L]`` / ``[E, L, I]``.

    ``scale_offset``: the norms scale by ``scale_offset + w`` (Muse Spark stores ``w`` as an offset from 1,
    initialised at 0: ``(1.0 + self.weight)``); ``0.0`` is a plain learned scale.
    """

    width: int
    pre_norm_eps: float
    post_norm_eps: float
    pre_norm: LatentNorm = "scale_after"
    post_norm: LatentNorm = "scale_before"
    scale_offset: float = 1.0


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
    sparsemixer_eps: float = 0.0
    """SparseMixer's ``jitter_eps`` (PhiMoE ``router_jitter_noise``); read only by ``weight_from="sparsemixer"``."""
    shared_slots: int = 0
    """``n`` extra router rows (after the ``E + Z`` routable classes) that score the shared experts (Inkling):
    never selected, always weighted. Their scores join the k picked ones as ``k + n`` weights, renormalised
    and scaled together; the last ``n`` gate the shared experts (``SharedSpec.gate="router"``)."""
    learned_scale: bool = False
    """A trained scalar ``router.scale [1]`` that multiplies every weight after ``routed_scaling`` (Inkling's
    ``global_scale``)."""
    input_norm_eps: float | None = None
    """The router reads ``x / sqrt(mean(x²) + eps) ⊙ router.input_norm.weight [H]`` instead of ``x`` (Gemma 4:
    its weightless ``router.norm`` times the learned ``router.scale``; its ``× H^-½`` is ``logit_multiplier``)."""
    expert_scale: bool = False
    """A trained ``router.expert_scale [E]``: after renormalisation, the weight of the slot routed to expert ``i``
    is multiplied by ``expert_scale[i]`` (Gemma 4's ``per_expert_scale``)."""


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

    ``gate="router"`` (Inkling): ``n = RouterSpec.shared_slots`` separate shared experts, each of width
    ``intermediate``, stacked (``shared.w_gate/w_up [n, S, H]``, ``shared.w_down [n, H, S]``); expert ``j``'s
    output is multiplied by the weight of router slot ``E + Z + j`` (``Routing.shared_weights[:, j]``).

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
    """Auxiliary losses the architecture computes (and so the gate checks).

    ``aux_group``: the load-balancing statistics ``f_e``, ``P_e`` are taken over the whole batch
    (``"batch"``), or per sequence and the per-sequence losses averaged (``"sequence"``: Switch's
    ``load_balancing_loss_func`` over ``[B, S, E]``). ``padding``: padded rows are left out of both
    losses (``"excluded"``, transformers' masked losses) or count like any other row
    (``"included"``: Switch's loss functions take no attention mask).
    """

    aux: AuxKind = "none"
    z_loss: bool = False
    aux_group: Literal["batch", "sequence"] = "batch"
    padding: Literal["excluded", "included"] = "excluded"


@dataclass(frozen=True)
class TokenTypeSets:
    """Per-token expert sets chosen by a token-type id (ERNIE-4.5-VL: ``text_moe`` / ``vision_moe``).

    The block holds one routed sub-MoE per set, each with its own router and experts but the same
    router family, ``E``, ``k`` and expert form as the spec; token ``n`` with type id ``t[n]`` is routed
    and computed by set ``set_of_type[t[n]]`` only. Set 0's parameters keep the canonical names
    (``router.*``, ``experts.*``); set ``s ≥ 1``'s are the same names qualified ``@s``
    (``router.weight@1``, ``experts.w_up@1``). Shared experts, output bias and norm act on every token.
    The router logits ``[N, E]`` are each token's own set's, and the losses are taken over them pooled
    (expert ``e`` of every set counts as one expert).

    ``set_of_type``: type id → set (ERNIE: ``(0, 1, 1)``: text 0, image 1 and video 2 → vision).
    ``intermediates``: the expert width ``I`` of each set; set 0's is the spec's ``intermediate``.
    """

    set_of_type: tuple[int, ...]
    intermediates: tuple[int, ...]

    @property
    def num_sets(self) -> int:
        return len(self.intermediates)


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
    output_bias: bool = False
    """A learned bias ``output.bias [H]`` added to every token's block output, after the shared experts and
    before ``output_norm`` (JetMoE's ``JetMoeMoE.bias``)."""
    routed_input_norm_eps: float | None = None
    """RMSNorm (weight ``routed_input_norm.weight [H]``) of what the routed experts read; the router and the shared
    experts read ``x`` itself (Gemma 4's ``pre_feedforward_layernorm_2``)."""
    routed_output_norm_eps: float | None = None
    """RMSNorm (weight ``routed_output_norm.weight [H]``) of the routed experts' weighted sum, before the shared
    experts, ``output_bias`` and ``output_norm`` are added (Gemma 4's ``post_feedforward_layernorm_2``)."""
    latent: LatentSpec | None = None
    """Experts at a latent width behind a normed down projection and an up projection (Muse Spark); shared
    experts, ``output_bias`` and ``output_norm`` act at H, after the up projection."""
    token_sets: TokenTypeSets | None = None
    """Expert sets chosen per token by a token-type id supplied with the inputs (ERNIE-4.5-VL)."""

    @property
    def router_width(self) -> int:
        """The classes a token can be routed to: ``E + Z``."""
        return self.num_experts + self.identity_experts

    @property
    def router_rows(self) -> int:
        """Rows of ``router.weight``: the routable classes and the shared-expert slots."""
        return self.router_width + self.router.shared_slots

    @property
    def expert_width(self) -> int:
        """The width the routed experts read and write: ``latent.width`` for a latent MoE, else ``hidden``."""
        return self.latent.width if self.latent is not None else self.hidden

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.num_experts + self.identity_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")
        g = self.router.group_limit
        if g is not None and (self.num_experts % g.n_group or not 0 < g.topk_group <= g.n_group):
            raise ValueError(f"group_limit {g} does not divide {self.num_experts} experts")
        if g is not None and self.top_k > g.topk_group * (self.num_experts // g.n_group):
            # the k picks must come from the kept groups: beyond them, a block picks masked experts
            raise ValueError(
                f"top_k={self.top_k} exceeds the {g.topk_group * (self.num_experts // g.n_group)} experts of the "
                f"{g.topk_group} kept group(s) of {self.num_experts // g.n_group}"
            )
        if g is not None and g.score == "top2sum" and self.num_experts // g.n_group < 2:
            # a group's score is the sum of its two best experts: a group of one has no second
            raise ValueError(f"group_limit {g}: top2sum needs at least 2 experts per group, not 1")
        r = self.router
        if r.weight_from == "sparsemixer" and (r.select_on != "logits" or r.selection_bias or g is not None):
            # SparseMixer picks by repeated argmax of the raw logits: a bias or a group limit has no place in it.
            raise ValueError("weight_from='sparsemixer' selects on the logits, without selection bias or group limit")
        if (r.shared_slots > 0) != (self.shared is not None and self.shared.gate == "router") or (
            r.shared_slots
            and (r.scoring == "softmax" or r.weight_from != "scores" or r.scaling_site != "weights" or r.capacity)
        ):
            # The shared slots are scored one by one (sigmoid-like) and weighted like a picked slot; a softmax
            # over which classes, output-side scaling or capacity drops of an always-on slot have no meaning.
            raise ValueError(
                "shared_slots needs SharedSpec(gate='router') and back: elementwise scores, weights from the "
                "scores, scaling in the weights, no capacity"
            )
        if self.latent is not None and (
            self.identity_experts
            or self.experts.weight_site != "output"
            or (r.capacity is not None and r.capacity.dropped == "passthrough")
        ):
            # Each of these adds x [H] (or scales it) into the expert sum, which a latent MoE forms at width L.
            raise ValueError("a latent MoE has no identity experts, input-side weights or passthrough drops")
        if self.latent is not None and (
            self.routed_input_norm_eps is not None or self.routed_output_norm_eps is not None
        ):
            # The routed norms act at H around the expert sum; a latent MoE forms that sum at width L.
            raise ValueError("a latent MoE has no routed input/output norm")
        sets = self.token_sets
        if sets is not None and (
            sets.intermediates[:1] != (self.intermediate,)
            or sorted(set(sets.set_of_type)) != list(range(sets.num_sets))
            or r.capacity is not None
        ):
            # Set 0 is the spec's own router/experts, every set is reachable from some type id, and a
            # capacity (counted over a sequence) has no meaning across sets that each see a subset.
            raise ValueError(
                f"token_sets {sets}: set 0 must have intermediate={self.intermediate}, every set a type, no capacity"
            )
