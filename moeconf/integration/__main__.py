"""``python -m moeconf.integration leaf|configure MODULE:ATTR [--arch A ...]``: audit a framework's
function by its import path and print moeconf's report; exit 0 passed, 1 a failure, 2 usage error or
nothing judged (the rule of ``moeconf check``)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from moeconf.integration.configure import audit_configure_function
from moeconf.integration.leaf import audit_leaf_function
from moeconf.integration.results import render, report_exit_code
from moeconf.registry import UnknownName
from moeconf.tools.audit import KNOWN_COEF

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moeconf.integration", description=__doc__)
    parser.add_argument("kind", choices=("leaf", "configure"), help="which function is audited")
    parser.add_argument("function", help="MODULE:ATTR of the framework's function (imported)")
    parser.add_argument("--arch", action="append", help="a model type the function must handle (repeatable)")
    parser.add_argument("--ranks", type=int, default=2, help="leaf: simulated ranks (default 2)")
    parser.add_argument("--no-zero3", action="store_true", help="leaf: leave is_deepspeed_zero3_enabled() False")
    parser.add_argument("--coef", type=float, default=KNOWN_COEF, help=f"configure: coefficient (default {KNOWN_COEF})")
    parser.add_argument("--format", choices=("text", "json", "junit"), default="text")
    return parser


def load_function(ref: str) -> Any:
    """Import ``MODULE:ATTR`` (ATTR may be dotted); ``ValueError`` naming what is missing."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{ref!r}: expected MODULE:ATTR")
    try:
        value: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(value, part):
            raise ValueError(f"{module_name} has no {attr}")
        value = getattr(value, part)
    if not callable(value):
        raise TypeError(f"{ref} is not callable")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        fn = load_function(args.function)
        if args.kind == "leaf":
            results = audit_leaf_function(fn, archs=args.arch, ranks=args.ranks, zero3=not args.no_zero3)
        else:
            results = audit_configure_function(fn, archs=args.arch, coef=args.coef)
    except (ValueError, TypeError, UnknownName) as exc:
        print(f"python -m moeconf.integration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(render(results, args.format))
    return report_exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
