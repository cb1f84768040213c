"""Output of discover: the proposed entry as Python source to paste into a registry module, and the
ranked candidates as text or JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING, Any

from moeconf.registry.entry import ArchEntry

if TYPE_CHECKING:
    from moeconf.tools.discover.search import DiscoveryResult

SOURCE_IMPORTS = (
    "from moeconf.registry.entry import ArchEntry, Binding\n"
    "from moeconf.spec import Capacity, ExpertSpec, GroupLimit, LossSpec, MoESpec, RouterSpec, SharedSpec\n"
)
"""The imports the rendered source needs."""

OPTIONAL_FIELDS = (
    "router_logits_index",
    "routing_from",
    "aux_coef_attr",
    "block_init",
    "block_config_attr",
    "experts_implementations",
)
"""``ArchEntry`` fields written only where they differ from the default."""

TABLE_ROWS = 15
"""Candidates listed in the text report (the rest are counted)."""

SHOWN_FAILURES = 5
"""Failing parity records quoted in the text report."""


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _value_source(value: Any) -> str:
    """Python source for a spec value: dataclasses with their non-default fields only."""
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return repr(value)
    args = [
        f"{f.name}={_value_source(getattr(value, f.name))}"
        for f in dataclasses.fields(value)
        if _default(f) is dataclasses.MISSING or getattr(value, f.name) != _default(f)
    ]
    return f"{type(value).__name__}({', '.join(args)})"


def entry_source(entry: ArchEntry) -> str:
    """The entry as Python source, ready to paste into a registry module (after ``SOURCE_IMPORTS``)."""
    bindings = ",\n".join(
        f"        Binding({b.path!r}, {b.canonical!r}" + (f", {b.layout!r}" if b.layout != "identity" else "") + ")"
        for b in entry.params
    )
    plain = (
        "model_type",
        "config_class",
        "config_kwargs",
        "modeling_module",
        "block_class",
        "block_path",
        "model_class",
    )
    fields = [f"{name}={getattr(entry, name)!r}" for name in plain]
    fields += [f"spec={_value_source(entry.spec)}", f"params=(\n{bindings},\n    )"]
    fields += [f"{name}={getattr(entry, name)!r}" for name in ("router_path", "experts_path")]
    defaults = {f.name: _default(f) for f in dataclasses.fields(ArchEntry)}
    fields += [f"{name}={getattr(entry, name)!r}" for name in OPTIONAL_FIELDS if getattr(entry, name) != defaults[name]]
    return "ArchEntry(\n" + "".join(f"    {f},\n" for f in fields) + ")"


def _table(result: DiscoveryResult, limit: int) -> list[str]:
    lines = [f"\n{'#':>3}  {'match':<5} {'routing':<8} {'max err':>9}  candidate"]
    for i, c in enumerate(result.candidates[:limit], 1):
        off = c.routing_mismatch
        routing = "-" if off is None else "ok" if off == 0 else f"{off} off"
        err = "-" if c.max_error == math.inf else f"{c.max_error:.2e}"
        lines.append(f"{i:>3}  {'yes' if c.matched else 'no':<5} {routing:<8} {err:>9}  {c.name}")
    if len(result.candidates) > limit:
        lines.append(f"     ... {len(result.candidates) - limit} more candidates")
    return lines


def _parity(result: DiscoveryResult) -> str:
    bad = [r for r in result.parity if r.status in ("fail", "error")]
    passed = f"{len(result.parity) - len(bad)}/{len(result.parity)}"
    quoted = "".join(f"\n  - {r.case}/{r.check}: {r.status}: {r.message}" for r in bad[:SHOWN_FAILURES])
    return f"\nparity (hf-eager, fp32, every case): {passed} records pass{quoted}"


def render_text(result: DiscoveryResult, limit: int = TABLE_ROWS) -> str:
    """The block's site, the ranked candidates, the proposal with its parity, or the explanation."""
    lines = [f"moeconf discover {result.model_type}"]
    if result.site is not None:
        s = result.site
        lines.append(f"block: {s.block_class} at {s.model_class}.{s.block_path} ({s.modeling_module})")
    if result.candidates:
        lines += _table(result, limit)
    if result.proposed_entry_source:
        lines += ["\nproposed registry entry:\n", SOURCE_IMPORTS + "\n" + result.proposed_entry_source]
        if result.parity:
            lines.append(_parity(result))
    if result.explanation:
        lines.append("\n" + result.explanation)
    lines.append(f"\n({len(result.candidates)} candidates, {result.wall_s:.1f} s)")
    return "\n".join(lines) + "\n"


def render_json(result: DiscoveryResult) -> str:
    """The result as JSON; candidate errors are the checks' max |actual − expected| on the judged tokens."""
    candidates = [
        {
            "candidate": c.name,
            "matched": c.matched,
            "tokens": c.tokens,
            "routing_mismatch": c.routing_mismatch,
            "weights_error": c.error("routing_weights"),
            "output_error": c.error("output"),
            "message": c.message,
        }
        for c in result.candidates
    ]
    document = {
        "model_type": result.model_type,
        "ok": result.ok,
        "block": dataclasses.asdict(result.site) if result.site else None,
        "candidates": candidates,
        "proposed_entry_source": result.proposed_entry_source,
        "parity": [r.to_dict() for r in result.parity],
        "explanation": result.explanation,
        "wall_s": result.wall_s,
    }
    return json.dumps(document, indent=1, default=str)
