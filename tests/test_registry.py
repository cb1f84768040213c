"""The registry is data that must match the installed transformers: every entry builds, binds every
parameter, round-trips its layouts, and names a block path that really holds its block class."""

from __future__ import annotations

import pytest
import torch
import transformers

from moeconf.harness.cases import draw_params
from moeconf.hf.block import EntryError, block_class, build_block, build_config, load_params
from moeconf.params import param_shapes
from moeconf.registry import LAYOUTS, REGISTRY, UnknownName, get_entry
from moeconf.registry.layouts import split_to_canonical

ENTRIES = sorted(REGISTRY)


@pytest.mark.parametrize("arch", ENTRIES)
def test_bindings_round_trip_through_the_real_block(arch: str) -> None:
    entry = REGISTRY[arch]
    block = build_block(entry)
    params = draw_params(entry.spec, 1)
    load_params(entry, block, params)
    shapes = param_shapes(entry.spec)
    for binding in entry.params:
        tensor = dict(block.named_parameters()).get(binding.path, dict(block.named_buffers()).get(binding.path))
        # A per-expert binding (Switch, NLLB: one module per expert) holds expert `binding.expert`'s slice.
        expected = {n: params[n] if binding.expert is None else params[n][binding.expert] for n in binding.canonical}
        parts = split_to_canonical(
            LAYOUTS[binding.layout],
            tensor.detach().double(),
            tuple(shapes[n] if binding.expert is None else shapes[n][1:] for n in binding.canonical),
        )
        for name, part in zip(binding.canonical, parts):
            assert torch.allclose(part, expected[name].float().double()), f"{arch}: {binding.path} -> {name}"


@pytest.mark.parametrize("arch", ENTRIES)
def test_block_path_holds_the_block_class_in_a_tiny_model(arch: str) -> None:
    entry = REGISTRY[arch]
    model = getattr(transformers, entry.model_class)(build_config(entry))
    assert isinstance(model.get_submodule(entry.block_path), block_class(entry))
    assert any(type(m).__name__ in entry.zero3_leaves for m in model.modules())


@pytest.mark.parametrize("arch", ENTRIES)
def test_aux_coefficient_attribute_exists(arch: str) -> None:
    entry = REGISTRY[arch]
    if entry.aux_coef_attr is None:
        assert entry.spec.losses.aux == "none"
        return
    value = build_config(entry)
    for part in entry.aux_coef_attr.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    assert float(value) > 0


def test_unbound_parameter_is_a_configuration_error() -> None:
    import dataclasses

    entry = REGISTRY["mixtral"]
    broken = dataclasses.replace(entry, params=entry.params[:-1])
    with pytest.raises(EntryError, match="not bound"):
        load_params(broken, build_block(broken), draw_params(entry.spec, 0))


def test_wrong_layout_is_rejected_because_h_differs_from_i() -> None:
    import dataclasses

    entry = REGISTRY["gpt_oss"]
    params = tuple(
        dataclasses.replace(b, layout="identity") if b.path == "experts.down_proj" else b for b in entry.params
    )
    broken = dataclasses.replace(entry, params=params)
    with pytest.raises(EntryError, match="experts.down_proj"):
        load_params(broken, build_block(broken), draw_params(entry.spec, 0))


def test_unknown_architecture_lists_the_registered_ones() -> None:
    with pytest.raises(UnknownName, match="mixtral"):
        get_entry("nope")


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layouts_are_invertible(name: str) -> None:
    layout = LAYOUTS[name]
    canon = tuple(torch.randn(3, 4, 5) for _ in range(layout.arity))
    if name == "gate_up_bias_interleaved":
        canon = tuple(torch.randn(3, 4) for _ in range(layout.arity))
    back = split_to_canonical(layout, layout.to_block(*canon), tuple(c.shape for c in canon))
    assert all(torch.equal(a, b) for a, b in zip(back, canon))
