"""A framework's *model-level* patch (``model_patch(model, entry)``) is gated on the block it leaves.

Frameworks pick their patch from the model: its config's ``architectures``, the classes in its module
tree. The hook hands the patch a tiny full model, so such a patch is applied exactly as in training.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from moeconf.backends.hf import HFBlockBackend
from moeconf.harness.engine import Selection, run_arch
from moeconf.registry import ArchEntry, get_entry

MIXTRAL = get_entry("mixtral")
SEEN: list[tuple[str, ...]] = []


def _records(backend: HFBlockBackend, entry: ArchEntry) -> list:
    sel = Selection(archs=(entry.model_type,), backends=(backend.name,))
    return [r for group in run_arch(sel, entry, {backend.name: backend}, "fp32") for r in group]


def _blocks(model: nn.Module, class_name: str) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == class_name]


def framework_patch(model: nn.Module, entry: ArchEntry) -> None:
    """Like a framework: choose by the checkpoint's architectures, patch every block of that model."""
    SEEN.append(tuple(model.config.architectures or ()))
    if "MixtralForCausalLM" not in (model.config.architectures or ()):
        return
    for block in _blocks(model, "MixtralSparseMoeBlock"):
        original = type(block).forward
        block.forward = types.MethodType(lambda self, x, _f=original: _f(self, x), block)


def framework_patch_unnormalised(model: nn.Module, entry: ArchEntry) -> None:
    """Seeded bug: the patched forward scales the experts' output (as if the top-k weights were not
    renormalised), chosen by the model's architecture as a framework would."""
    if "MixtralForCausalLM" not in (model.config.architectures or ()):
        return
    for block in _blocks(model, "MixtralSparseMoeBlock"):
        original = type(block).forward

        def forward(self: nn.Module, x: torch.Tensor, _f=original) -> torch.Tensor:  # type: ignore[no-untyped-def]
            return _f(self, x) * 0.5

        block.forward = types.MethodType(forward, block)


def test_the_patch_sees_a_full_model_with_its_architectures_and_passes_when_correct() -> None:
    SEEN.clear()
    records = _records(HFBlockBackend("fw-model-patch", model_patch=framework_patch), MIXTRAL)
    assert SEEN and all(seen == ("MixtralForCausalLM",) for seen in SEEN)
    assert records and [r for r in records if r.status != "pass"] == []


def test_a_model_level_patch_that_breaks_the_block_is_red() -> None:
    records = _records(HFBlockBackend("fw-model-patch-bug", model_patch=framework_patch_unnormalised), MIXTRAL)
    failing = {r.check for r in records if r.status == "fail"}
    assert "output" in failing and "routing" not in failing, failing
