"""A backend written from scratch by an outsider plugs in and is gated like the built-ins."""

from __future__ import annotations

from moeconf.backends import Backend, resolve_backend
from moeconf.harness.engine import Selection, run_arch
from tests.toy_backend import TOY_ENTRY, toy, toy_z_detached, toy_z_from_probs


def _records(backend: Backend, name: str) -> list:
    sel = Selection(archs=(TOY_ENTRY.model_type,), backends=(name,))
    return [r for group in run_arch(sel, TOY_ENTRY, {name: backend}, "fp32") for r in group]


def test_protocol_and_module_attr_resolution() -> None:
    assert isinstance(toy, Backend)
    assert resolve_backend("tests.toy_backend:toy") is toy
    assert resolve_backend("tests.toy_backend:ToyZLossBackend").name == "toy-zloss"  # a class is instantiated


def test_correct_outsider_backend_passes_every_check_including_z_loss() -> None:
    records = _records(toy, "tests.toy_backend:toy")
    assert {r.check for r in records} >= {
        "routing",
        "output",
        "z_loss",
        "grad_z_loss",
        "grad_experts",
        "grad_router",
        "grad_input",
    }
    assert [r for r in records if r.status != "pass"] == []


def test_z_loss_on_probabilities_is_caught() -> None:
    records = _records(toy_z_from_probs, "tests.toy_backend:toy_z_from_probs")
    failing = {r.check for r in records if r.status == "fail"}
    assert failing == {"z_loss", "grad_z_loss"}


def test_z_loss_on_detached_logits_is_caught_by_its_gradient() -> None:
    records = _records(toy_z_detached, "tests.toy_backend:toy_z_detached")
    failing = {r.check: r.message for r in records if r.status == "fail"}
    assert set(failing) == {"grad_z_loss"}, failing  # the value is right; only the gradient is gone
    assert "z_loss has no gradient w.r.t. input, router.weight" in failing["grad_z_loss"]
