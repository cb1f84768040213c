"""Presets: the MoE layer sizes of published checkpoints, and how a registry entry is resized to them.

A preset names a checkpoint and carries its MoE dimensions as published in the model's ``config.json`` on
the Hugging Face hub (``source`` names the model id and the fields read). It picks the architecture whose
registry entry supplies everything else: the router family, the experts' form and the parameter layout
are that entry's; only the sizes change (``sized_entry``). ``tiny`` keeps the registry's tiny sizes and
works with any architecture.

``--scale F`` shrinks hidden and the intermediate widths (rounded to a multiple of 8) and keeps the
expert count, top-k and groups, so the routing problem stays the checkpoint's while the matmuls shrink.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from moeconf.hf.block import build_block, load_params
from moeconf.params import param_shapes
from moeconf.registry.entry import ArchEntry
from moeconf.spec import MoESpec


class PresetError(ValueError):
    """A preset that cannot be applied to an architecture (a usage error, named in one line)."""


@dataclass(frozen=True)
class Preset:
    """One checkpoint's MoE layer.

    Attributes:
        name: the ``--preset`` value.
        arch: registry model type whose block is built; None for ``tiny`` (any architecture).
        hidden: model width H.
        intermediate: width I of one routed expert.
        num_experts: routed experts E.
        top_k: experts per token k.
        shared_intermediate: total width of the shared expert(s) (fused into one MLP), None without.
        n_group, topk_group: group-limited routing (DeepSeek-V3), None without.
        source: where the numbers come from (hub model id and ``config.json`` fields).
    """

    name: str
    arch: str | None
    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    shared_intermediate: int | None = None
    n_group: int | None = None
    topk_group: int | None = None
    source: str = ""


TINY = "tiny"
DEFAULT_TINY_ARCH = "qwen3_moe"
"""Architecture of ``--preset tiny`` when no ``--arch`` is given."""

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        # Sizes 0: tiny takes the entry's own (``preset_sizes``).
        Preset(TINY, None, 0, 0, 0, 0, source="the registry entry's own tiny config (moeconf/registry)"),
        Preset(
            "mixtral-8x7b",
            "mixtral",
            hidden=4096,
            intermediate=14336,
            num_experts=8,
            top_k=2,
            source="mistralai/Mixtral-8x7B-v0.1 config.json: hidden_size=4096, intermediate_size=14336, "
            "num_local_experts=8, num_experts_per_tok=2",
        ),
        Preset(
            "qwen3-30b-a3b",
            "qwen3_moe",
            hidden=2048,
            intermediate=768,
            num_experts=128,
            top_k=8,
            source="Qwen/Qwen3-30B-A3B config.json: hidden_size=2048, moe_intermediate_size=768, "
            "num_experts=128, num_experts_per_tok=8",
        ),
        Preset(
            "deepseek-v3",
            "deepseek_v3",
            hidden=7168,
            intermediate=2048,
            num_experts=256,
            top_k=8,
            shared_intermediate=2048,
            n_group=8,
            topk_group=4,
            source="deepseek-ai/DeepSeek-V3 config.json: hidden_size=7168, moe_intermediate_size=2048, "
            "n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1 (1 x 2048), n_group=8, topk_group=4",
        ),
        Preset(
            "gpt-oss-20b",
            "gpt_oss",
            hidden=2880,
            intermediate=2880,
            num_experts=32,
            top_k=4,
            source="openai/gpt-oss-20b config.json: hidden_size=2880, intermediate_size=2880, "
            "num_local_experts=32, num_experts_per_tok=4",
        ),
        Preset(
            "qwen2-57b-a14b",
            "qwen2_moe",
            hidden=3584,
            intermediate=2560,
            num_experts=64,
            top_k=8,
            shared_intermediate=20480,
            source="Qwen/Qwen2-57B-A14B config.json: hidden_size=3584, moe_intermediate_size=2560, "
            "num_experts=64, num_experts_per_tok=8, shared_expert_intermediate_size=20480",
        ),
        Preset(
            "olmoe-1b-7b",
            "olmoe",
            hidden=2048,
            intermediate=1024,
            num_experts=64,
            top_k=8,
            source="allenai/OLMoE-1B-7B-0924 config.json: hidden_size=2048, intermediate_size=1024, "
            "num_experts=64, num_experts_per_tok=8",
        ),
    )
}


@dataclass(frozen=True)
class Sizes:
    """The sizes a block is built with (after ``--scale``)."""

    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    shared_intermediate: int | None
    n_group: int | None
    topk_group: int | None


# Config fields that carry each size, by the names transformers' MoE configs use. The expert width is
# ``moe_intermediate_size`` where a config has one (then ``intermediate_size`` is the dense MLP's).
_HIDDEN_KEYS = ("hidden_size", "d_model")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "num_experts_per_token")
_INTERMEDIATE_KEYS = ("moe_intermediate_size", "ffn_hidden_size", "expert_intermediate_size", "intermediate_size")
_SHARED_KEYS = ("shared_expert_intermediate_size",)
_SHARED_COUNT_KEY = "n_shared_experts"
_GROUP_KEYS = {"n_group": "n_group", "topk_group": "topk_group"}


def scaled_width(width: int, scale: float) -> int:
    """``width × scale`` rounded to a multiple of 8 (at least 8): vector units and GEMM tiles like it."""
    return width if scale == 1.0 else max(8, round(width * scale / 8) * 8)


def preset_sizes(preset: Preset, spec: MoESpec, scale: float = 1.0) -> Sizes:
    """The sizes of ``preset`` (``tiny``: the spec's own), with hidden/intermediate widths scaled."""
    if preset.name == TINY:
        shared = spec.shared.intermediate if spec.shared else None
        group = spec.router.group_limit
        base = Sizes(
            spec.hidden,
            spec.intermediate,
            spec.num_experts,
            spec.top_k,
            shared,
            group.n_group if group else None,
            group.topk_group if group else None,
        )
    else:
        base = Sizes(
            preset.hidden,
            preset.intermediate,
            preset.num_experts,
            preset.top_k,
            preset.shared_intermediate,
            preset.n_group,
            preset.topk_group,
        )
    return dataclasses.replace(
        base,
        hidden=scaled_width(base.hidden, scale),
        intermediate=scaled_width(base.intermediate, scale),
        shared_intermediate=None if base.shared_intermediate is None else scaled_width(base.shared_intermediate, scale),
    )


def _block_kwargs(entry: ArchEntry, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The (sub-)dict of ``kwargs`` the block's config is built from (``block_config_attr``, dotted)."""
    target = kwargs
    for attr in (entry.block_config_attr or "").split("."):
        if attr:
            target = target[attr]
    return target


def _set_first(config: dict[str, Any], keys: tuple[str, ...], value: int) -> bool:
    """Set the first of ``keys`` present in ``config`` or in one of its nested dicts (``ffn_config``)."""
    for key in keys:
        if key in config:
            config[key] = value
            return True
    return any(_set_first(v, keys, value) for v in config.values() if isinstance(v, dict))


def _find(config: Mapping[str, Any], key: str) -> Any:
    if key in config:
        return config[key]
    for value in config.values():
        if isinstance(value, Mapping):
            found = _find(value, key)
            if found is not None:
                return found
    return None


def sized_entry(entry: ArchEntry, sizes: Sizes) -> ArchEntry:
    """``entry`` with its tiny config and spec resized to ``sizes``; everything else is the entry's.

    Raises ``PresetError`` when the entry's config has no field for a size, or when the sizes ask for a
    shared expert or groups the architecture does not have.
    """
    spec = entry.spec
    if sizes == preset_sizes(PRESETS[TINY], spec):
        return entry  # the registry's own sizes: nothing to override (also for entries that cannot be resized)
    kwargs = copy.deepcopy(entry.config_kwargs)
    config = _block_kwargs(entry, kwargs)
    required = (
        (_HIDDEN_KEYS, sizes.hidden, "hidden size"),
        (_EXPERT_KEYS, sizes.num_experts, "expert count"),
        (_TOP_K_KEYS, sizes.top_k, "top-k"),
        (_INTERMEDIATE_KEYS, sizes.intermediate, "expert intermediate size"),
    )
    for keys, value, what in required:
        if not _set_first(config, keys, value):
            raise PresetError(f"{entry.model_type}: no config field for the {what} (looked for {', '.join(keys)})")
    shared = spec.shared
    if (sizes.shared_intermediate is None) != (shared is None):
        has = "has" if shared is not None else "has no"
        raise PresetError(f"{entry.model_type} {has} shared experts; the preset's sizes disagree")
    if shared is not None and sizes.shared_intermediate is not None:
        shared_count = _find(config, _SHARED_COUNT_KEY)
        if shared_count is not None:  # DeepSeek: n_shared_experts experts of the routed width, fused
            if sizes.shared_intermediate != shared_count * sizes.intermediate:
                raise PresetError(
                    f"{entry.model_type}: shared width {sizes.shared_intermediate} must be "
                    f"{_SHARED_COUNT_KEY}={shared_count} x {sizes.intermediate}"
                )
        elif not _set_first(config, _SHARED_KEYS, sizes.shared_intermediate):
            raise PresetError(f"{entry.model_type}: no config field for the shared expert width")
        shared = dataclasses.replace(shared, intermediate=sizes.shared_intermediate)
    group = spec.router.group_limit
    if (sizes.n_group is None) != (group is None):
        raise PresetError(f"{entry.model_type}: group-limited routing of the preset and the architecture disagree")
    if group is not None and sizes.n_group is not None and sizes.topk_group is not None:
        for key, value in (("n_group", sizes.n_group), ("topk_group", sizes.topk_group)):
            if not _set_first(config, (key,), value):
                raise PresetError(f"{entry.model_type}: no config field {key}")
        group = dataclasses.replace(group, n_group=sizes.n_group, topk_group=sizes.topk_group)
    try:
        new_spec = dataclasses.replace(
            spec,
            hidden=sizes.hidden,
            intermediate=sizes.intermediate,
            num_experts=sizes.num_experts,
            top_k=sizes.top_k,
            shared=shared,
            router=dataclasses.replace(spec.router, group_limit=group),
        )
    except ValueError as exc:
        raise PresetError(f"{entry.model_type}: {exc}") from None
    return dataclasses.replace(entry, config_kwargs=kwargs, spec=new_spec)


def check_sized_entry(entry: ArchEntry) -> None:
    """Build the resized block on the ``meta`` device (no memory) and load meta parameters of the spec's
    shapes through the entry's bindings: every size reached the block, or ``PresetError`` says which not.
    """
    try:
        with torch.device("meta"):
            block = build_block(entry)
            params = {name: torch.empty(shape) for name, shape in param_shapes(entry.spec).items()}
            load_params(entry, block, params)
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        raise PresetError(f"{entry.model_type} at {_describe(entry.spec)}: {exc}") from None


def _describe(spec: MoESpec) -> str:
    shared = f" S={spec.shared.intermediate}" if spec.shared else ""
    return f"H={spec.hidden} I={spec.intermediate} E={spec.num_experts} k={spec.top_k}{shared}"


def describe_sizes(spec: MoESpec) -> str:
    """``H=2048 I=768 E=128 k=8`` (plus shared width and groups) for messages and the report."""
    group = spec.router.group_limit
    return _describe(spec) + (f" groups={group.n_group}/{group.topk_group}" if group else "")


def weight_count(spec: MoESpec) -> int:
    """Parameters of the whole layer (every expert, router, shared experts)."""
    return sum(math.prod(shape) for shape in param_shapes(spec).values())
