"""``moeconf discover MODEL_TYPE``: propose a registry entry for a transformers MoE model type.

Candidate specs are tested the way ``moeconf check`` tests a registered entry (hf-eager backend,
harness checks, fp32 tolerances); discover itself only finds the block and proposes candidates:

1. ``config``: a tiny config for the type (the registry's tiny sizes under the config's field names);
2. ``locate``: the MoE block in a tiny model built on the meta device;
3. ``facts``: the block's structure, and one hooked forward (router output, experts call);
4. ``bindings``: readings of the block's tensors as canonical parameters;
5. ``candidates``: router families × expert forms × shared forms, each an ``ArchEntry``;
6. ``rank``: candidates judged by the backend and the checks, ranked; the best checked by the engine;
7. ``render``: the proposal as Python source, the ranking as text or JSON.
"""

from __future__ import annotations

import sys

from moeconf.harness.report import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from moeconf.tools.discover.candidates import RouterCandidate, router_candidates
from moeconf.tools.discover.config import TINY_SCALING, shrink_kwargs
from moeconf.tools.discover.rank import Candidate, verify_entry
from moeconf.tools.discover.render import SOURCE_IMPORTS, entry_source, render_json, render_text
from moeconf.tools.discover.search import DiscoveryResult, discover

RENDERERS = {"text": render_text, "json": lambda result: render_json(result) + "\n"}


def _usage_error(message: str) -> int:
    print(f"moeconf: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run_discover(model_type: str, *, fmt: str = "text", config_kwargs: dict | None = None, seed: int = 0) -> int:
    """Discover ``model_type``'s entry and print the report to stdout.

    Returns 0 when a candidate matches and passes the engine's parity records, 1 when none matches (or
    the proposal fails parity; the report explains), 2 on a usage error (one line on stderr).
    """
    from transformers import CONFIG_MAPPING

    if fmt not in RENDERERS:
        return _usage_error(f"unknown format {fmt!r}; choose from {', '.join(RENDERERS)}")
    if config_kwargs is not None and not isinstance(config_kwargs, dict):
        return _usage_error(f"config kwargs must be a JSON object, got {type(config_kwargs).__name__}")
    if model_type not in CONFIG_MAPPING:
        return _usage_error(f"transformers has no model type {model_type!r}")
    result = discover(model_type, config_kwargs, verify=True, seed=seed)
    sys.stdout.write(RENDERERS[fmt](result))
    parity_failed = any(r.status in ("fail", "error") for r in result.parity)
    return EXIT_OK if result.ok and not parity_failed else EXIT_FAILED


__all__ = [
    "SOURCE_IMPORTS",
    "TINY_SCALING",
    "Candidate",
    "DiscoveryResult",
    "RouterCandidate",
    "discover",
    "entry_source",
    "router_candidates",
    "run_discover",
    "shrink_kwargs",
    "verify_entry",
]
