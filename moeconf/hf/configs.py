"""Config samples of a registry entry on the installed transformers: the entry at any config.

``at_config(entry, sample)`` is the entry as if registered with that config: its config kwargs with the
sample's values, its spec derived from the built config (``registry.config_space.derive_spec``), its
per-expert bindings for the sample's expert count, and only the declarations whose ``when`` holds.
Everything downstream (inputs, reference, backends, ranks) reads the entry, so a sample needs no
other support.

Kinds (``--config``): ``tiny`` (the registered config), ``default`` (the config class's own default of
every routing field), ``published`` (released checkpoints, ``ArchEntry.published``) and
``hypothesis`` (seeded property-based variants, ``moeconf.strategies``).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from typing import Any

from moeconf.hf.block import block_config, build_config
from moeconf.registry.config_space import (
    SIZE_TARGETS,
    TINY,
    ConfigSample,
    FieldRule,
    InvalidConfig,
    config_rules,
    derive_spec,
    read_field,
)
from moeconf.registry.entry import ArchEntry, Binding, Expectation

DEFAULT_HYPOTHESIS_EXAMPLES = 4
"""Hypothesis variants per entry that ``--config hypothesis`` runs (``hypothesis:0`` …)."""


@cache
def field_rules(entry: ArchEntry) -> tuple[FieldRule, ...]:
    """The entry's config fields that set its spec, read against its tiny config."""
    return config_rules(entry.spec, entry.config_fields, block_config(entry, build_config(entry)))


def varied_rules(entry: ArchEntry) -> tuple[FieldRule, ...]:
    """The routing-relevant fields: every rule but the tensor sizes (which stay tiny in every sample)."""
    return tuple(r for r in field_rules(entry) if r.target not in SIZE_TARGETS)


def tiny_values(entry: ArchEntry) -> dict[str, Any]:
    """The routing fields' values in the tiny config (the config class default where it sets none)."""
    config = block_config(entry, build_config(entry))
    return {r.field: read_field(config, r.field) for r in varied_rules(entry)}


def _set(kwargs: dict[str, Any], field: str, value: Any) -> None:
    """Set (or, for ``None``-as-default, remove) ``field`` (dotted) in nested config kwargs."""
    *parents, last = field.split(".")
    for part in parents:
        kwargs = kwargs.setdefault(part, {})
    kwargs[last] = value


def _remove(kwargs: dict[str, Any], field: str) -> None:
    *parents, last = field.split(".")
    for part in parents:
        kwargs = kwargs.get(part, {})
    kwargs.pop(last, None)


def _kwargs_for(entry: ArchEntry, sample: ConfigSample) -> dict[str, Any]:
    kwargs = copy.deepcopy(entry.config_kwargs)
    target = kwargs if entry.block_config_attr is None else _sub(kwargs, entry.block_config_attr)
    aliases = _aliases(entry)
    ruled = {r.field for r in field_rules(entry)}
    for name, value in sample.values:
        # a published config.json may spell a field by its alias (Qwen3's num_experts for num_local_experts)
        field = aliases.get(name, name)
        if field not in ruled and sample.kind != "invalid":
            continue  # a field this release's config does not have (the sample is written for the latest)
        for alias in [k for k, v in aliases.items() if v == field and k in target]:
            del target[alias]  # the tiny kwargs may spell the field by an alias, which would win over a removal
        if sample.kind == "default" and value is None:  # the class default
            _remove(target, field)
        else:
            _set(target, field, value)
    return kwargs


@cache
def _aliases(entry: ArchEntry) -> dict[str, str]:
    """The block config class's ``attribute_map`` (alias → attribute)."""
    return dict(getattr(type(block_config(entry, build_config(entry))), "attribute_map", {}) or {})


def _sub(kwargs: dict[str, Any], attr: str) -> dict[str, Any]:
    for part in attr.split("."):
        kwargs = kwargs.setdefault(part, {})
    return kwargs


_EXPERT_COMPONENT = re.compile(r"^(.*?)(\d+)$")


def _per_expert(params: Sequence[Binding], num_experts: int) -> tuple[Binding, ...]:
    """Per-expert bindings (``Binding.expert``) for ``num_experts`` experts, from expert 0's: the path
    component that names expert 0 (``0``, ``expert_0``) names expert ``e``."""
    shared = [b for b in params if b.expert is None]
    first = [b for b in params if b.expert == 0]

    def renamed(binding: Binding, e: int) -> Binding:
        parts = binding.path.split(".")
        for i, part in enumerate(parts):
            match = _EXPERT_COMPONENT.match(part)
            if match and match.group(2) == "0":
                parts[i] = f"{match.group(1)}{e}"
                break
        return dataclasses.replace(binding, path=".".join(parts), expert=e)

    return tuple(shared) + tuple(renamed(b, e) for e in range(num_experts) for b in first)


def _resolved(entry: ArchEntry, sample: ConfigSample, config: Any | None) -> tuple[Expectation, ...]:
    """The declarations that hold at ``sample``: its own (``config=``) or every sample's, whose ``when``
    values ``config`` has (None: a config the class refused, where no ``when`` can hold)."""
    return tuple(
        dataclasses.replace(x, when=(), config=None)
        for x in entry.expectations
        if x.config in (None, sample.name, sample.kind)
        and (not x.when or (config is not None and _holds(x.when, config)))
    )


def _holds(when: Iterable[tuple[str, Any]], config: Any) -> bool:
    try:
        return all(read_field(config, field) == value for field, value in when)
    except (AttributeError, KeyError):
        return False


_VARIANTS: dict[tuple[int, str, ConfigSample], ArchEntry] = {}


def at_config(entry: ArchEntry, sample: ConfigSample = TINY) -> ArchEntry:
    """The entry at ``sample``'s config (the entry itself, declarations resolved, for ``tiny``).

    Raises ``InvalidConfig`` when the sample describes no valid layer (the reference's verdict; whether
    the block rejects it too is ``config_rejects_invalid``'s business). Never raises for ``tiny``: a
    config the installed release cannot build is the backends' to report, record by record.
    """
    if sample == TINY and not any(x.when or x.config for x in entry.expectations):
        return entry  # nothing to resolve, nothing built (a whole-entry skip may not even build its config)
    key = (id(entry), entry.model_type, sample)
    cached = _VARIANTS.get(key)
    if cached is not None:
        return cached
    if sample == TINY:
        try:
            config: Any = block_config(entry, build_config(entry))
        except Exception:  # noqa: BLE001 - a release without this config (class): judged when run
            config = None
        variant = dataclasses.replace(entry, expectations=_resolved(entry, sample, config))
        _VARIANTS[key] = variant
        return variant
    kwargs = _kwargs_for(entry, sample)
    probe = dataclasses.replace(entry, config_kwargs=kwargs)
    config = block_config(probe, build_config(probe))
    spec = derive_spec(entry.spec, field_rules(entry), config) if sample.kind != "tiny" else entry.spec
    params = entry.params
    if spec.num_experts != entry.spec.num_experts and any(b.expert is not None for b in params):
        params = _per_expert(params, spec.num_experts)
    expectations = _resolved(entry, sample, config)
    variant = dataclasses.replace(
        entry, config_kwargs=kwargs, spec=spec, params=params, expectations=expectations, sample=sample
    )
    _VARIANTS[key] = variant
    return variant


COUNT_TARGETS = frozenset(
    {"num_experts", "top_k", "n_group", "topk_group", "shared_intermediate", "shared_multiple", "shared_slots"}
)
"""Targets that need a positive count: a class default of None or 0 there means "set me" or "feature off"
(Gemma 4's ``num_experts=None`` with ``enable_moe=False``), which the registered block cannot be."""


def default_sample(entry: ArchEntry) -> ConfigSample:
    """Every routing field at the config class's default (sizes stay tiny); a count whose class default
    is unset (None, 0, or absent) keeps its tiny value, and the sample's ``source`` names those fields."""
    rules = varied_rules(entry)
    removed = ConfigSample("default", "default", tuple((r.field, None) for r in rules))
    probe = dataclasses.replace(entry, config_kwargs=_kwargs_for(entry, removed))
    try:
        config: Any = block_config(probe, build_config(probe))
    except Exception:  # noqa: BLE001 - the class refuses its own defaults: keep every field, judged as built
        return removed
    tiny = tiny_values(entry)
    values: list[tuple[str, Any]] = []
    kept: list[str] = []
    for rule in rules:
        try:
            value = read_field(config, rule.field)
        except (AttributeError, KeyError, TypeError, ValueError):
            value = None
        if rule.target in COUNT_TARGETS and not value:
            values.append((rule.field, tiny[rule.field]))
            kept.append(rule.field)
        else:
            values.append((rule.field, None))
    source = f"class defaults; unset in the class, kept tiny: {', '.join(kept)}" if kept else "class defaults"
    return ConfigSample("default", "default", tuple(values), source=source)


def published_samples(entry: ArchEntry) -> tuple[ConfigSample, ...]:
    return tuple(ConfigSample(p.name, "published", tuple(p.values.items()), source=p.source) for p in entry.published)


def values_of(entry: ArchEntry, sample: ConfigSample) -> Mapping[str, Any]:
    """The routing fields' values a sample runs with (the class default resolved for ``default``)."""
    variant = at_config(entry, sample)
    config = block_config(variant, build_config(variant))
    return {r.field: read_field(config, r.field) for r in varied_rules(entry)}


__all__ = [
    "DEFAULT_HYPOTHESIS_EXAMPLES",
    "InvalidConfig",
    "at_config",
    "default_sample",
    "field_rules",
    "published_samples",
    "tiny_values",
    "values_of",
    "varied_rules",
]


def invalid_samples(entry: ArchEntry) -> tuple[ConfigSample, ...]:
    """Configs of ``entry`` that describe no valid layer, one per constraint its routing fields can break:
    ``invalid:top_k`` (k > E), ``invalid:n_group`` (a group count that does not divide E),
    ``invalid:topk_group`` (more kept groups than groups), ``invalid:kept`` (k beyond the experts of the
    kept groups)."""
    field = {r.target: r.field for r in varied_rules(entry)}
    tiny = tiny_values(entry)
    spec = entry.spec
    found: list[ConfigSample] = []
    if "top_k" in field:
        found.append(_invalid("top_k", {field["top_k"]: spec.router_width + 1}))
    group = spec.router.group_limit
    if group is not None and "n_group" in field and tiny.get(field["n_group"]) is not None:
        n_group = next(d for d in range(2, spec.num_experts + 2) if spec.num_experts % d)
        found.append(_invalid("n_group", {field["n_group"]: n_group}))
        if "topk_group" in field:
            found.append(_invalid("topk_group", {field["topk_group"]: group.n_group + 1}))
            kept = group.topk_group * (spec.num_experts // group.n_group)
            if "top_k" in field and kept < spec.num_experts:
                found.append(_invalid("kept", {field["top_k"]: kept + 1}))
    return tuple(found)


def _invalid(what: str, values: Mapping[str, Any]) -> ConfigSample:
    return ConfigSample(f"invalid:{what}", "invalid", tuple(values.items()))


def probe_at(entry: ArchEntry, sample: ConfigSample) -> tuple[ArchEntry, BaseException | None]:
    """The entry with ``sample``'s config kwargs but its tiny spec (for a sample with no valid spec), its
    declarations resolved against the config when the config class builds it; and what the config
    class raised, if it rejected the config."""
    kwargs = _kwargs_for(entry, sample)
    probe = dataclasses.replace(entry, config_kwargs=kwargs, sample=sample)
    try:
        config = block_config(probe, build_config(probe))
    except Exception as exc:  # noqa: BLE001 - the config class's own validation: a rejection
        return dataclasses.replace(probe, expectations=_resolved(entry, sample, None)), exc
    return dataclasses.replace(probe, expectations=_resolved(entry, sample, config)), None
