"""Checks on fabricated observations: the rules that no transformers block breaks by itself."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from moeconf.backends import Observation
from moeconf.harness.cases import CASES, make_inputs
from moeconf.harness.checks import CHECKS, TOLERANCES, CheckInput, compare
from moeconf.reference import reference_forward, reference_gradients, reference_loss_gradients
from moeconf.registry import REGISTRY


def _perfect(arch: str = "mixtral", case: int = 2) -> tuple[CheckInput, list[int]]:
    """An observation equal to the reference, for the ``empty_expert`` case."""
    spec = REGISTRY[arch].spec
    inputs = make_inputs(spec, CASES[case], torch.float32, 0)
    ref = reference_forward(spec, inputs.params, inputs.hidden, inputs.attention_mask)
    grads = reference_gradients(spec, inputs.params, inputs.hidden, inputs.grad_output)
    loss_grads = reference_loss_gradients(spec, inputs.params, inputs.hidden, inputs.attention_mask)
    obs = Observation(
        output=ref.output.detach(),
        topk_index=ref.routing.index,
        topk_weights=ref.routing.weights.detach(),
        aux_loss=ref.aux_loss.detach(),
        recorded_router_logits=1,
        aux_loss_grads={k: v.clone() for k, v in loss_grads["aux_loss"].items()},
        grads={k: v.clone() for k, v in grads.items()},
    )
    used = set(ref.routing.index.flatten().tolist())
    check_input = CheckInput(spec, ref, grads, obs, "fp32", loss_grads)
    return check_input, [e for e in range(spec.num_experts) if e not in used]


def _with(c: CheckInput, dtype: str | None = None, **observed: Any) -> CheckInput:
    return dataclasses.replace(c, observation=dataclasses.replace(c.observation, **observed), dtype=dtype or c.dtype)


def _aux_grads(c: CheckInput) -> dict[str, torch.Tensor]:
    grads = c.observation.aux_loss_grads or {}
    return {k: v for k, v in grads.items() if v is not None}


def test_reference_against_itself_passes_every_check() -> None:
    c, empty = _perfect()
    assert 7 in empty  # the case keeps the last expert empty
    assert all(CHECKS[name](c).passed is not False for name in CHECKS)
    assert CHECKS["aux_loss"](c).passed and CHECKS["grad_aux_loss"](c).passed


def test_aux_loss_fails_when_the_recorder_collects_the_block_not_exactly_once() -> None:
    """The model computes its loss from what its recorder collects: 0 drops the layer, 2 doubles it."""
    c, _ = _perfect()
    for count, says in ((0, "collected nothing"), (2, "2 tensors for one forward")):
        for check in ("aux_loss", "grad_aux_loss"):
            outcome = CHECKS[check](_with(c, recorded_router_logits=count))
            assert outcome.passed is False and says in outcome.message, (count, check, outcome.message)
    assert CHECKS["aux_loss"](_with(c, recorded_router_logits=None)).passed  # not observed: value only


def test_aux_loss_without_gradient_fails_grad_aux_loss_in_every_dtype() -> None:
    """Right value, no path to the router (detached logits, a re-wrapped float): None or zero grads."""
    c, _ = _perfect()
    grads = _aux_grads(c)
    for dtype in ("fp32", "bf16"):
        none = CHECKS["grad_aux_loss"](_with(c, dtype, aux_loss_grads={k: None for k in grads}))
        assert none.passed is False and "aux_loss has no gradient w.r.t. input, router.weight" in none.message
        zeros = CHECKS["grad_aux_loss"](
            _with(c, dtype, aux_loss_grads={k: torch.zeros_like(v) for k, v in grads.items()})
        )
        assert zeros.passed is False and "zero gradient" in zeros.message
        assert CHECKS["aux_loss"](_with(c, dtype, aux_loss_grads={k: None for k in grads})).passed


def test_grad_aux_loss_tolerance_scales_with_the_gradient_not_with_one() -> None:
    """The aux gradients are O(1/N): a bf16 tolerance of max(1, ·) would pass a halved gradient."""
    c, _ = _perfect()
    grads = _aux_grads(c)
    assert grads and max(float(v.abs().max()) for v in grads.values()) < 0.5
    halved = {k: v * 0.5 for k, v in grads.items()}
    assert CHECKS["grad_aux_loss"](_with(c, "bf16", aux_loss_grads=halved)).passed is False
    close = {k: v * 1.02 for k, v in grads.items()}
    assert CHECKS["grad_aux_loss"](_with(c, "bf16", aux_loss_grads=close)).passed
    assert CHECKS["grad_aux_loss"](_with(c, "fp32", aux_loss_grads=close)).passed is False


def test_none_grad_of_an_unrouted_expert_fails_grad_experts() -> None:
    """Per-expert ModuleLists (transformers 4.x) leave .grad None for an expert with no tokens."""
    c, empty = _perfect()
    obs = dataclasses.replace(c.observation, missing_grads=(f"experts.w_up[{empty[0]}]",))
    outcome = CHECKS["grad_experts"](dataclasses.replace(c, observation=obs))
    assert outcome.passed is False and "is None" in outcome.message


def test_routing_set_not_order() -> None:
    c, _ = _perfect()
    flipped = c.observation.topk_index.flip(-1)
    obs = dataclasses.replace(c.observation, topk_index=flipped, topk_weights=c.observation.topk_weights.flip(-1))
    c2 = dataclasses.replace(c, observation=obs)
    assert CHECKS["routing"](c2).passed and CHECKS["routing_weights"](c2).passed
    wrong = flipped.clone()
    wrong[0, 0] = (wrong[0, 0] + 3) % 8 if (wrong[0, 0] + 3) % 8 != wrong[0, 1] else (wrong[0, 0] + 4) % 8
    assert (
        CHECKS["routing"](dataclasses.replace(c, observation=dataclasses.replace(obs, topk_index=wrong))).passed
        is False
    )


def test_unobserved_quantities_are_skips_not_passes() -> None:
    c, _ = _perfect()
    blind = Observation(output=c.observation.output)
    results = {name: CHECKS[name](dataclasses.replace(c, observation=blind)).passed for name in CHECKS}
    assert results["output"] is True
    assert results["routing"] is None and results["aux_loss"] is None and results["grad_experts"] is None
    assert results["grad_aux_loss"] is None


def test_compare_reports_shape_nan_and_worst_element() -> None:
    tol = TOLERANCES["fp32"]["output"]
    assert compare("x", torch.zeros(2), torch.zeros(3, dtype=torch.float64), tol).passed is False
    assert "non-finite" in compare("x", torch.tensor([float("nan")]), torch.zeros(1, dtype=torch.float64), tol).message
    got = compare("x", torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2, dtype=torch.float64), tol)
    assert got.passed is False and "x[0, 1]" in got.message
