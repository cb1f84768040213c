"""Which config fields each entry's samples exercise, at which values: ``python -m moeconf.tools.config_coverage``.

One Markdown row per registered entry: every routing field (``moeconf.hf.configs.varied_rules``) with the
values it takes across the ``tiny``, ``default``, ``published`` and ``hypothesis`` samples (tiny's value
first), and the published checkpoints. The coverage rule (``tests/test_config_space.py``) asks for two
values or more per field; this prints them for a reader.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from moeconf.harness.samples import samples
from moeconf.hf.configs import values_of, varied_rules
from moeconf.registry import REGISTRY, ArchEntry
from moeconf.registry.config_space import InvalidConfig
from moeconf.registry.versions import absent_reason

KINDS = ("tiny", "default", "published", "hypothesis")


def field_values(entry: ArchEntry) -> dict[str, list[object]]:
    """Routing field → its distinct values over the entry's samples, in sample order (tiny first)."""
    seen: dict[str, list[object]] = {r.field: [] for r in varied_rules(entry)}
    for sample in samples(entry, KINDS):
        try:
            values = values_of(entry, sample)
        except InvalidConfig:  # a class default describing no layer: config_rejects_invalid judges it
            continue
        for name, value in values.items():
            if value not in seen[name]:
                seen[name].append(value)
    return seen


def _value(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def rows(archs: Sequence[str]) -> list[str]:
    lines = ["| model type | routing fields: values (tiny first) | published |", "|---|---|---|"]
    for arch in archs:
        entry = REGISTRY[arch]
        if absent_reason(arch) is not None:
            lines.append(f"| {arch} | {absent_reason(arch)} | |")
            continue
        fields = "; ".join(f"`{f}` {', '.join(map(_value, v))}" for f, v in field_values(entry).items())
        published = ", ".join(p.repo for p in entry.published)
        lines.append(f"| {arch} | {fields or '(none)'} | {published} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeconf.tools.config_coverage", description=__doc__)
    parser.add_argument("--arch", nargs="+", help="model types (default: every registered one)")
    args = parser.parse_args(argv)
    unknown = [a for a in args.arch or () if a not in REGISTRY]
    if unknown:
        parser.error(f"unknown model type(s): {', '.join(unknown)}")
    sys.stdout.write("\n".join(rows(args.arch or sorted(REGISTRY))) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
