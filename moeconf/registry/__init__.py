"""The architecture registry: one declarative ``ArchEntry`` per HF ``model_type``."""

from __future__ import annotations

from moeconf.registry.core import CORE_ENTRIES
from moeconf.registry.entry import ArchEntry, Binding, Expectation
from moeconf.registry.layouts import LAYOUTS, Layout

REGISTRY: dict[str, ArchEntry] = {entry.model_type: entry for entry in CORE_ENTRIES}


class UnknownName(ValueError):
    """A name the user gave is not registered; the message lists the valid ones."""


def get_entry(model_type: str) -> ArchEntry:
    """The entry for ``model_type``, or ``UnknownName`` listing every registered type."""
    try:
        return REGISTRY[model_type]
    except KeyError:
        raise UnknownName(f"unknown architecture {model_type!r}; registered: {', '.join(sorted(REGISTRY))}") from None


__all__ = ["ArchEntry", "Binding", "Expectation", "LAYOUTS", "Layout", "REGISTRY", "UnknownName", "get_entry"]
