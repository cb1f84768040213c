"""The architecture registry: one declarative ``ArchEntry`` per HF ``model_type``."""

from __future__ import annotations

from moeconf.registry import deepseek_family, sigmoid_family, softmax_family
from moeconf.registry.core import CORE_ENTRIES
from moeconf.registry.entry import ArchEntry, Binding, Expectation
from moeconf.registry.layouts import LAYOUTS, Layout


def _index(*groups: tuple[ArchEntry, ...]) -> dict[str, ArchEntry]:
    registry: dict[str, ArchEntry] = {}
    for entry in (e for group in groups for e in group):
        if entry.model_type in registry:
            raise ValueError(f"model_type {entry.model_type!r} is registered twice")
        registry[entry.model_type] = entry
    return registry


REGISTRY: dict[str, ArchEntry] = _index(
    CORE_ENTRIES, softmax_family.ENTRIES, deepseek_family.ENTRIES, sigmoid_family.ENTRIES
)


class UnknownName(ValueError):
    """A name the user gave is not registered; the message lists the valid ones."""


def get_entry(model_type: str) -> ArchEntry:
    """The entry for ``model_type``, or ``UnknownName`` listing every registered type."""
    try:
        return REGISTRY[model_type]
    except KeyError:
        raise UnknownName(f"unknown architecture {model_type!r}; registered: {', '.join(sorted(REGISTRY))}") from None


__all__ = ["ArchEntry", "Binding", "Expectation", "LAYOUTS", "Layout", "REGISTRY", "UnknownName", "get_entry"]
