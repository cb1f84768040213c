"""Proof that every check can fail: seeded bugs must turn the intended check red."""

from __future__ import annotations

import pytest

from tests.records import assert_caught, records_of, red
from tests.seeded import SEEDED


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("bug", sorted(SEEDED))
def test_seeded_bug_is_reported_under_the_right_check(bug: str, dtype: str) -> None:
    arch, must_fail, must_pass = SEEDED[bug]
    records = records_of(arch, f"tests.seeded:{bug}", dtype)
    assert_caught(bug, records, must_fail, must_pass)
    for r in records:
        if r.status == "fail":
            assert r.message and f"--backend tests.seeded:{bug}" in r.repro


def test_the_unbroken_backend_passes_the_same_selection() -> None:
    """Control: the seeded archs are green without the bug, so red above means the bug."""
    for arch in sorted({arch for arch, _, _ in SEEDED.values()}):
        assert red(records_of(arch, "hf-eager")) == set()


def test_a_router_the_model_does_not_record_is_invisible_to_a_router_hook() -> None:
    """Why ``aux_loss`` reads the model's recorder: with the router replaced by a module of another
    class, a hook on the router submodule still sees the right logits (and the right loss), while
    the model records nothing for the layer and trains without its aux loss."""
    import torch

    from moeconf.backends import RunRequest
    from moeconf.harness.cases import CASES, make_inputs
    from moeconf.hf.block import framework_losses, recording
    from moeconf.reference import reference_forward
    from moeconf.registry import REGISTRY
    from tests.seeded import router_not_recorded

    entry = REGISTRY["mixtral"]
    inputs = make_inputs(entry.spec, CASES[0], torch.float32, 0)
    request = RunRequest(
        entry, inputs.params, inputs.hidden, inputs.attention_mask, inputs.grad_output, torch.float32, "cpu"
    )
    block = router_not_recorded.prepare(request)
    with torch.no_grad(), recording(entry, block) as rec:
        block(inputs.hidden.float())
    hooked = rec.hooked_router_logits(entry)
    assert rec.recorded_count == 0 and hooked is not None
    aux, _ = framework_losses(entry, [hooked], inputs.attention_mask)
    expected = reference_forward(entry.spec, inputs.params, inputs.hidden, inputs.attention_mask).aux_loss
    assert aux is not None and expected is not None and abs(float(aux) - float(expected)) < 1e-5
