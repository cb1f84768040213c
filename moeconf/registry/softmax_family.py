"""Registry entries: softmax family (data, not code; see core.py for the shared tiny sizes and helpers)."""

from __future__ import annotations

from moeconf.registry.entry import ArchEntry

ENTRIES: tuple[ArchEntry, ...] = ()
