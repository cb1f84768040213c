"""Checks: each compares one quantity of a backend's observation with the reference.

A check knows nothing about architectures or backends: it gets the spec, the reference result and
gradients, the observation and a tolerance, and returns an ``Outcome``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from moeconf.backends.base import Observation
from moeconf.reference import ReferenceResult
from moeconf.spec import MoESpec


@dataclass(frozen=True)
class Tolerance:
    """Pass iff ``|actual − expected| ≤ atol·scale + rtol·|expected|`` elementwise, where
    ``scale = max(1, max|expected|)`` of the compared tensor.

    NOTE: scaling atol by the tensor's magnitude keeps one tolerance meaningful for outputs of size
    O(1) and for weight gradients summed over many tokens (O(10)), where cancellation makes a purely
    elementwise relative bound meaningless.
    """

    atol: float
    rtol: float


# NOTE on bf16: the reference runs in float64 on bf16-rounded parameters and inputs, so these bound
# only the backend's own arithmetic. bf16 has unit roundoff u = 2^-9 ≈ 2e-3; a block chains ~6
# roundings (logits, weights, gate/up, activation·up, down, weighted sum), so errors of a few u of
# the tensor's scale are expected. Measured over the registry, seeds 0-4 (hf-eager/grouped-mm, CPU):
# outputs ≤ 0.8 % of scale; grads ≤ 2.9 % (the router grad of a single token, a rank-1 outer
# product of a softmax backward with cancellation), hence 2 % / 3 %. A wrong formula (a missed
# renormalisation, a swapped gate/up, a dropped expert) moves values by 10-100 %.
# Backward accumulates in bf16 in transformers' eager path (cf. TransformerEngine #1336).
TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "fp32": {
        "routing_weights": Tolerance(1e-6, 1e-5),
        "output": Tolerance(1e-5, 1e-5),
        "loss": Tolerance(1e-6, 1e-5),
        "grad": Tolerance(1e-5, 1e-4),
        "loss_grad": Tolerance(1e-5, 1e-4),
    },
    "bf16": {
        "routing_weights": Tolerance(1e-2, 1e-2),
        "output": Tolerance(2e-2, 2e-2),
        "loss": Tolerance(1e-2, 1e-2),
        "grad": Tolerance(3e-2, 3e-2),
        "loss_grad": Tolerance(2e-1, 5e-2),
    },
}
# NOTE on "loss_grad" (gradients of the aux / z loss, compared in units of their own max): in bf16,
# transformers' load_balancing_loss_func softmaxes the recorded bf16 logits in bf16, and for a
# token whose top expert dominates (p ≈ 0.9) the softmax backward P_e·(f_e − Σ f·P) cancels to a
# few percent of P_e, so bf16's 0.4 % error on P becomes ~10 % of the gradient. Measured over the
# registry, hf-eager, seeds 0-13: ≤ 1.8 % of scale except the single_token case (one token, no
# averaging) with sigmoid routers: 11.8 % (seed 3), 6.2 % (seed 8). fp32 stays at 1e-5 and judges
# the formula; bf16 still fails a missing, zero, sign-flipped or mis-scaled (×2) gradient.


@dataclass(frozen=True)
class Outcome:
    """One check's verdict before it is labelled with arch/backend/... by the engine."""

    passed: bool | None  # None: not applicable / not observable (reported as skip)
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    tol: Tolerance | None = None
    message: str = ""


@dataclass(frozen=True)
class CheckInput:
    spec: MoESpec
    reference: ReferenceResult
    reference_grads: dict[str, torch.Tensor]
    observation: Observation
    dtype: str
    reference_loss_grads: Mapping[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)
    """``"aux_loss"`` / ``"z_loss"`` → gradient of that reference loss w.r.t. ``"input"`` and the
    router's trained parameters (``reference_loss_gradients``); absent where the spec has no such loss."""


def compare(name: str, actual: torch.Tensor | None, expected: torch.Tensor, tol: Tolerance) -> Outcome:
    """Elementwise closeness with the worst element named in the message."""
    if actual is None:
        return Outcome(False, tol=tol, message=f"{name}: backend produced nothing (None)")
    actual = actual.detach().to(device="cpu", dtype=torch.float64)
    if actual.shape != expected.shape:
        return Outcome(
            False, tol=tol, message=f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
        )
    finite = torch.isfinite(actual)
    if not finite.all():
        # NOTE: the code under test computed garbage (a fail, not a malformed observation): say where.
        bad = (~finite).nonzero()
        first = tuple(int(i) for i in bad[0])
        where = list(first) if actual.dim() else ""
        return Outcome(
            False,
            float("inf"),
            float("inf"),
            tol,
            f"{name}{where}: got {float(actual[first])}, expected {float(expected[first]):.6g} "
            f"({len(bad)} of {actual.numel()} values non-finite)",
        )
    diff = (actual - expected).abs()
    rel = diff / expected.abs().clamp_min(1e-12)
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    excess = diff - (tol.atol * scale + tol.rtol * expected.abs())
    passed = bool((excess <= 0).all())
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_rel = float(rel.max()) if rel.numel() else 0.0
    message = ""
    if not passed:
        worst = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape)) if excess.dim() else ()
        message = f"{name}{list(worst)}: got {float(actual[worst]):.6g}, expected {float(expected[worst]):.6g}"
    return Outcome(passed, max_abs, max_rel, tol, message)


def merge(outcomes: list[Outcome]) -> Outcome:
    """All parts must pass; errors are the worst over parts; messages of failing parts are joined."""
    if not outcomes:
        return Outcome(None, message="nothing to compare")
    abs_errs = [o.max_abs_err for o in outcomes if o.max_abs_err is not None]
    rel_errs = [o.max_rel_err for o in outcomes if o.max_rel_err is not None]
    failed = [o.message for o in outcomes if o.passed is False]
    return Outcome(
        passed=not failed,
        max_abs_err=max(abs_errs) if abs_errs else None,
        max_rel_err=max(rel_errs) if rel_errs else None,
        tol=outcomes[0].tol,
        message="; ".join(failed[:3]) + (f" (+{len(failed) - 3} more)" if len(failed) > 3 else ""),
    )


def _sorted_by_index(index: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    index = index.detach().cpu().long()
    order = index.argsort(dim=-1)
    sorted_weights = None if weights is None else weights.detach().cpu().to(torch.float64).gather(1, order)
    return index.gather(1, order), sorted_weights


def check_routing(c: CheckInput) -> Outcome:
    """Selected experts per token, compared as sets."""
    if c.observation.topk_index is None:
        return Outcome(None, message="backend does not report routing")
    got, _ = _sorted_by_index(c.observation.topk_index, None)
    want = c.reference.routing.index
    if got.shape != want.shape:
        return Outcome(False, message=f"topk_index shape {tuple(got.shape)} != expected {tuple(want.shape)}")
    wrong = (got != want).any(dim=-1)
    if not wrong.any():
        return Outcome(True, 0.0, 0.0, Tolerance(0, 0))
    t = int(wrong.nonzero()[0])
    return Outcome(
        False,
        float(wrong.sum()),
        float(wrong.float().mean()),
        Tolerance(0, 0),
        f"{int(wrong.sum())}/{len(wrong)} tokens routed differently; token {t}: got {got[t].tolist()}, expected {want[t].tolist()}",
    )


def check_routing_weights(c: CheckInput) -> Outcome:
    """Routing weights aligned by expert index, on the tokens whose expert set matches."""
    obs = c.observation
    if obs.topk_index is None or obs.topk_weights is None:
        return Outcome(None, message="backend does not report routing weights")
    got_index, got_weights = _sorted_by_index(obs.topk_index, obs.topk_weights)
    want = c.reference.routing
    if got_index.shape != want.index.shape:
        return Outcome(
            False, message=f"topk_index shape {tuple(got_index.shape)} != expected {tuple(want.index.shape)}"
        )
    same = (got_index == want.index).all(dim=-1)
    if not same.any():
        return Outcome(False, message="no token routed as the reference; weights not comparable")
    outcome = compare(
        "topk_weights", got_weights[same], want.weights.detach()[same], TOLERANCES[c.dtype]["routing_weights"]
    )
    if not same.all():
        return Outcome(
            False,
            outcome.max_abs_err,
            outcome.max_rel_err,
            outcome.tol,
            f"compared {int(same.sum())}/{len(same)} tokens (others routed differently) {outcome.message}",
        )
    return outcome


def check_output(c: CheckInput) -> Outcome:
    return compare("output", c.observation.output, c.reference.output.detach(), TOLERANCES[c.dtype]["output"])


def _recorded_once(name: str, c: CheckInput) -> Outcome | None:
    """A failure when the framework's recorder did not collect the block's router logits exactly once.

    NOTE: the model computes its losses from what its output recorder collects, not from what the
    block routes with: a router replaced by a module of another class records nothing (the layer
    silently drops out of the loss), one called twice counts twice.
    """
    count = c.observation.recorded_router_logits
    if count is None or count == 1:
        return None
    what = (
        "nothing: the block drops out of the model's loss (router replaced by a module the recorder does not target?)"
        if count == 0
        else f"{count} tensors for one forward: the block counts {count} times in the model's loss"
    )
    return Outcome(False, message=f"{name}: the framework's router-logits recorder collected {what}")


def _not_judged(name: str, what: str, has_reference: bool, reported: bool, c: CheckInput) -> Outcome | None:
    """Why a loss (or its gradient) is not compared: the architecture has no such loss, the
    framework's own computation of it raised (a failure), the model's recorder collected the wrong
    number of router outputs (a failure), or the backend reports none."""
    if not has_reference:
        return Outcome(None, message=f"architecture has no {name}")
    raised = c.observation.loss_errors.get(name)
    if raised is not None:
        return Outcome(False, message=f"{name}: the framework's own computation of it raised {raised}")
    recorded = _recorded_once(name, c)
    if recorded is not None:
        return recorded
    if not reported:
        return Outcome(None, message=f"backend does not report {what}")
    return None


def _loss_check(name: str, got: torch.Tensor | None, want: torch.Tensor | None, c: CheckInput) -> Outcome:
    skipped = _not_judged(name, name, want is not None, got is not None, c)
    if skipped is not None:
        return skipped
    assert got is not None and want is not None  # _not_judged returned None: both are there
    return compare(name, torch.as_tensor(got).reshape(()), want.detach().reshape(()), TOLERANCES[c.dtype]["loss"])


def check_aux_loss(c: CheckInput) -> Outcome:
    """The backend's aux loss (from what *its model's recorder* collected, padded rows masked) vs the reference."""
    return _loss_check("aux_loss", c.observation.aux_loss, c.reference.aux_loss, c)


def check_z_loss(c: CheckInput) -> Outcome:
    return _loss_check("z_loss", c.observation.z_loss, c.reference.z_loss, c)


LOSS_GRAD_SCALE_FLOOR = 0.25
"""Smallest scale a loss gradient is normalised by (``_loss_grad_check``)."""


def _loss_grad_check(name: str, got: dict[str, torch.Tensor | None] | None, c: CheckInput) -> Outcome:
    """Gradient of a loss itself w.r.t. the block input and the router's parameters vs the reference.

    NOTE: a loss with the right value but no path back to the router (computed on detached logits,
    or a float re-wrapped as a tensor) never trains the router: its gradients are None or zero.
    The tolerance scales with the gradient's own magnitude (not ``max(1, ·)``): these gradients are
    O(1/N), so an absolute bf16 tolerance would let zeros pass.
    """
    want = c.reference_loss_grads.get(name)
    skipped = _not_judged(name, f"gradients of {name}", want is not None, got is not None, c)
    if skipped is not None:
        return skipped
    assert got is not None and want is not None  # _not_judged returned None: both are there
    tol = TOLERANCES[c.dtype]["loss_grad"]
    absent = [k for k in want if got.get(k) is None]
    if absent:
        return Outcome(
            False,
            tol=tol,
            message=f"{name} has no gradient w.r.t. {', '.join(absent)}: it cannot train the router "
            "(computed on detached router logits, or re-wrapped from a Python float?)",
        )
    parts = []
    for k, expected in want.items():
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        # NOTE: a loss (nearly) constant in the inputs has a (nearly) zero gradient: with k = E every expert
        # takes every token and f_e = 1 whatever the router does. The float64 reference then gives rounding
        # noise or a nearly cancelled sum, and the backend its own fp32 noise (~1e-6 for O(1) inputs);
        # dividing by the reference's scale would make that noise a failure. Normalised by at least 0.25,
        # the noise passes, while a detached or zeroed gradient (off by the whole gradient) still fails.
        scale = max(scale, LOSS_GRAD_SCALE_FLOOR)
        actual = got[k].detach().to(device="cpu", dtype=torch.float64)  # type: ignore[union-attr]
        parts.append(compare(f"grad {name} w.r.t. {k} (÷{scale:.3g})", actual / scale, expected / scale, tol))
    outcome = merge(parts)
    if outcome.passed is False and all(bool((got[k] == 0).all()) for k in want):  # type: ignore[union-attr]
        return dataclasses.replace(
            outcome, message=f"{name} has zero gradient w.r.t. {', '.join(want)}: it cannot train the router"
        )
    return outcome


def check_grad_aux_loss(c: CheckInput) -> Outcome:
    """d(aux_loss)/d(input, router params) of the framework's aux loss vs the reference's."""
    return _loss_grad_check("aux_loss", c.observation.aux_loss_grads, c)


def check_grad_z_loss(c: CheckInput) -> Outcome:
    """d(z_loss)/d(input, router params) of the framework's z-loss vs the reference's."""
    return _loss_grad_check("z_loss", c.observation.z_loss_grads, c)


def _grad_check(c: CheckInput, names: list[str]) -> Outcome:
    if not c.observation.grads:
        return Outcome(None, message="backend does not report gradients")
    tol = TOLERANCES[c.dtype]["grad"]
    parts = []
    for n in names:
        actual, expected = c.observation.grads.get(n), c.reference_grads[n]
        scale = _vanished_gradient_scale(c, expected)
        if scale is not None and actual is not None:
            actual, expected = actual.detach().to("cpu", torch.float64) / scale, expected / scale
            n = f"{n} (exactly 0 in exact arithmetic; ÷{scale:.3g}, the input gradient's scale)"
        parts.append(compare(f"grad {n}", actual, expected, tol))
    return merge(parts)


VANISHED_GRADIENT = 1e-2
"""A bf16 gradient whose exact value stays below this fraction of the input gradient's scale
(``_vanished_gradient_scale``)."""


def _vanished_gradient_scale(c: CheckInput, expected: torch.Tensor) -> float | None:
    """For bf16, the scale to judge a gradient by when its exact value (nearly) vanishes, else None.

    NOTE: with k = 1 and p-norm renormalisation (DBRX at its class defaults) every routing weight is 1
    whatever the router says, so d⟨out, G⟩/d router is exactly 0: a sum of O(|G|·|expert output|) terms
    that cancel. Gemma 4's per-expert scale at k = 1 is the same up to its output norm's eps: the norm
    undoes any scale of the one weight. bf16 keeps ~0.4 % of each term, so the computed gradient is that
    much of the terms' size, not of its own (vanishing) size; the input gradient, made of the same terms,
    is that size. Below 1 % of it a bf16 gradient is judged in its units; fp32 judges it as usual.
    """
    if c.dtype != "bf16" or expected.numel() == 0:
        return None
    reference_input = c.reference_grads.get("input")
    if reference_input is None or reference_input.numel() == 0:
        return None
    scale = max(1.0, float(reference_input.abs().max()))
    return scale if float(expected.abs().max()) < VANISHED_GRADIENT * scale else None


def check_grad_input(c: CheckInput) -> Outcome:
    return _grad_check(c, ["input"])


def check_grad_router(c: CheckInput) -> Outcome:
    return _grad_check(c, [n for n in c.reference_grads if n.startswith("router.")])


def _unrouted_experts(c: CheckInput) -> list[int]:
    routing = c.reference.routing
    used = set(routing.index[routing.kept].tolist())
    return [e for e in range(c.spec.num_experts) if e not in used]


def check_grad_experts(c: CheckInput) -> Outcome:
    """Every expert's weight (and bias) grads, the block's output bias (JetMoE, one ``[H]`` vector
    after the expert sum) and a latent MoE's projections and norms around the experts (``latent.*``,
    Muse Spark); an expert that received no token must get exact zeros.

    NOTE: exact, not approximate: uninitialised output rows of an empty group (transformers PR
    #48205) or a None grad (the ZeRO-2/FSDP hang, DeepSpeed #5066) are the bugs this catches.
    """
    names = [n for n in c.reference_grads if n.startswith("experts.")]
    # The routed-expert norms (Gemma 4) act on every routed expert's input or sum, so they are judged here.
    around = ("output.", "latent.", "routed_input_norm.", "routed_output_norm.")
    outcome = _grad_check(c, names + [n for n in c.reference_grads if n.startswith(around)])
    problems = [
        f"grad {m} is None, expected exact zeros" for m in c.observation.missing_grads if m.startswith("experts.")
    ]
    for e in _unrouted_experts(c):
        for n in names:
            grad = c.observation.grads.get(n)
            if grad is not None and bool((grad[e] != 0).any()):
                problems.append(
                    f"expert {e} received no token but grad {n}[{e}] is not exactly zero (max {float(grad[e].abs().max()):.3g})"
                )
    if not problems:
        return outcome
    return Outcome(
        False,
        outcome.max_abs_err,
        outcome.max_rel_err,
        outcome.tol,
        "; ".join(problems[:2] + [outcome.message]).strip("; "),
    )


def check_grad_shared_experts(c: CheckInput) -> Outcome:
    names = [n for n in c.reference_grads if n.startswith(("shared.", "output_norm."))]
    if not names:
        return Outcome(None, message="architecture has no shared experts")
    return _grad_check(c, names)


CHECKS: dict[str, Callable[[CheckInput], Outcome]] = {
    "routing": check_routing,
    "routing_weights": check_routing_weights,
    "output": check_output,
    "aux_loss": check_aux_loss,
    "z_loss": check_z_loss,
    "grad_input": check_grad_input,
    "grad_router": check_grad_router,
    "grad_experts": check_grad_experts,
    "grad_shared_experts": check_grad_shared_experts,
    "grad_aux_loss": check_grad_aux_loss,
    "grad_z_loss": check_grad_z_loss,
}


def applicable_checks(spec: MoESpec) -> list[str]:
    """The checks that exist for an architecture (no aux check where the model has no aux loss, ...)."""
    names = list(CHECKS)
    if spec.losses.aux == "none":
        names.remove("aux_loss")
        names.remove("grad_aux_loss")
    if not spec.losses.z_loss:
        names.remove("z_loss")
        names.remove("grad_z_loss")
    if spec.shared is None:
        names.remove("grad_shared_experts")
    return names
