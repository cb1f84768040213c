"""The architecture registry: one declarative ``ArchEntry`` per HF ``model_type``."""

from __future__ import annotations

from moeconf.registry import (
    capacity_family,
    deepseek_family,
    extra_family,
    gated_shared_family,
    gemma4_family,
    latent_family,
    mixer_family,
    sigmoid_family,
    softmax_family,
    token_type_family,
)
from moeconf.registry.core import CORE_ENTRIES
from moeconf.registry.entry import ArchEntry, Binding, Expectation
from moeconf.registry.layouts import LAYOUTS, Layout


def _index(*groups: tuple[ArchEntry, ...]) -> dict[str, ArchEntry]:
    """Entries by model type, each as the installed transformers release needs it (its declared
    ``RELEASE_OVERRIDES`` whose range holds, ``moeconf.registry.legacy``)."""
    from moeconf.registry.legacy import for_installed_release

    registry: dict[str, ArchEntry] = {}
    for entry in (e for group in groups for e in group):
        if entry.model_type in registry:
            raise ValueError(f"model_type {entry.model_type!r} is registered twice")
        registry[entry.model_type] = for_installed_release(entry)
    return registry


REGISTRY: dict[str, ArchEntry] = _index(
    CORE_ENTRIES,
    softmax_family.ENTRIES,
    deepseek_family.ENTRIES,
    gemma4_family.ENTRIES,
    sigmoid_family.ENTRIES,
    extra_family.ENTRIES,
    mixer_family.ENTRIES,
    capacity_family.ENTRIES,
    latent_family.ENTRIES,
    token_type_family.ENTRIES,
    gated_shared_family.ENTRIES,
)
"""Every entry, on every release: under 4.x the types without a 4.x variant (``legacy.LEGACY_4X``) are
registered too and reported ``skip`` with the reason (``versions.absent_reason``), never missing."""


class UnknownName(ValueError):
    """A name the user gave is not registered; the message lists the valid ones."""


def get_entry(model_type: str) -> ArchEntry:
    """The entry for ``model_type``: built in, else registered from outside (``--registry``, the
    ``moeconf.architectures`` entry points, loaded on the first miss); ``UnknownName`` listing every
    registered type otherwise (``RegistryLoadError``, a subclass, when an entry point is broken)."""
    entry = REGISTRY.get(model_type)
    if entry is not None:
        return entry
    # NOTE: imported here, not at the top: outside.py imports this package's names.
    from moeconf.registry.outside import load_entry_points, outside_entries

    load_entry_points()
    outside = outside_entries()
    if model_type in outside:
        return outside[model_type]
    known = ", ".join(sorted(REGISTRY))
    extra = f"; registered from outside: {', '.join(sorted(outside))}" if outside else ""
    raise UnknownName(f"unknown architecture {model_type!r}; registered: {known}{extra}")


def all_entries() -> dict[str, ArchEntry]:
    """The built-in entries, then the outside ones (entry points loaded first), by model type."""
    from moeconf.registry.outside import load_entry_points, outside_entries

    load_entry_points()
    return {**REGISTRY, **outside_entries()}


__all__ = [
    "LAYOUTS",
    "REGISTRY",
    "ArchEntry",
    "Binding",
    "Expectation",
    "Layout",
    "UnknownName",
    "all_entries",
    "get_entry",
]
