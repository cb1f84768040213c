"""Command line: ``moeconf list | check | discover`` (also ``python -m moeconf``).

Exit codes: 0 every record passed (xfail counts as passed), 1 a check failed or errored,
2 usage or configuration error (one line naming what was wrong).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from moeconf.backends import resolve_backend
from moeconf.devices import DEVICES, DTYPES, use_threads_for_tiny_shapes
from moeconf.harness.cases import CASE_NAMES
from moeconf.harness.checks import CHECKS
from moeconf.harness.engine import CheckResult, Selection, run_selection
from moeconf.harness.partition_checks import PARTITION_CHECKS, STEPS_CASE
from moeconf.harness.report import FAILING, RENDERERS, progress_line, write_atomically
from moeconf.registry import REGISTRY, UnknownName, get_entry

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_BACKENDS = ("hf-eager", "hf-grouped-mm", "hf-batched-mm")


def _quiet_transformers() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeconf", description="Conformance gate for Mixture-of-Experts layers.")
    sub = parser.add_subparsers(dest="command", required=True)

    lst = sub.add_parser("list", help="architectures x backends with their status")
    lst.add_argument("--backend", nargs="+", default=list(DEFAULT_BACKENDS), help="backends to show")
    lst.add_argument("--device", default="cpu", choices=DEVICES)
    lst.add_argument("--format", default="text", choices=("text", "json"))

    chk = sub.add_parser("check", help="run the parity checks against the float64 reference")
    chk.add_argument("--arch", nargs="+", metavar="A", help="model types (default: every registered one)")
    chk.add_argument(
        "--backend",
        nargs="+",
        default=["hf-eager"],
        metavar="B",
        help="backend names, entry points, or package.module:attr (default: hf-eager)",
    )
    chk.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES))
    chk.add_argument("--device", default="cpu", choices=DEVICES)
    chk.add_argument(
        "--case",
        nargs="+",
        choices=[*CASE_NAMES, STEPS_CASE],
        help=f"input cases (default: all; {STEPS_CASE} runs on multi-rank backends only)",
    )
    chk.add_argument(
        "--check",
        nargs="+",
        choices=[*CHECKS, *PARTITION_CHECKS, "config"],
        help="checks (default: all parity/partition checks that apply); 'config' runs the configuration "
        "audit (ZeRO-3 leaf registration, loss = CE + coef·aux) on a tiny full model",
    )
    chk.add_argument("--seed", type=int, default=0)
    chk.add_argument("--format", default="text", choices=tuple(RENDERERS))
    chk.add_argument("--output", type=Path, help="write the report here (whole or not at all) instead of stdout")
    chk.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    disc = sub.add_parser("discover", add_help=False, help="propose a registry entry for a transformers MoE model type")
    disc.add_argument(
        "args", nargs=argparse.REMAINDER, help="MODEL_TYPE [--format text|json] [--config-kwargs JSON] [--seed N]"
    )
    return parser


def _list(args: argparse.Namespace) -> int:
    backends = {name: resolve_backend(name) for name in args.backend}
    from moeconf.tools.coverage import DECLARED_UNSUPPORTED

    rows = []
    for entry in REGISTRY.values():
        statuses = {}
        for name, backend in backends.items():
            reason = backend.supports(entry, "fp32", args.device)
            declared = [x for x in entry.expectations if x.backend in (None, name)]
            if reason is not None:
                statuses[name] = {"status": "unsupported", "reason": reason}
            elif declared:
                statuses[name] = {"status": declared[0].status, "reason": declared[0].reason}
            else:
                statuses[name] = {"status": "supported", "reason": ""}
        rows.append({"model_type": entry.model_type, "block_class": entry.block_class, "backends": statuses})
    for model_type, reason in sorted(DECLARED_UNSUPPORTED.items()):
        unsupported = {"status": "unsupported", "reason": reason}
        rows.append({"model_type": model_type, "block_class": "-", "backends": dict.fromkeys(backends, unsupported)})
    if args.format == "json":
        print(json.dumps({"architectures": rows}, indent=1))
        return EXIT_OK
    print(f"{'model_type':<16} {'block':<26} " + " ".join(f"{n:<15}" for n in backends))
    for row in rows:
        cells = " ".join(f"{row['backends'][n]['status']:<15}" for n in backends)
        print(f"{row['model_type']:<16} {row['block_class']:<26} {cells}")
    notes = [
        f"- {row['model_type']} / {n}: {s['status']}: {s['reason']}"
        for row in rows
        for n, s in row["backends"].items()
        if s["reason"]
    ]
    if notes:
        print("\nnotes:\n" + "\n".join(notes))
    print(
        f"\n{len(rows)} model types ({len(REGISTRY)} registered, {len(DECLARED_UNSUPPORTED)} declared unsupported), "
        f"{len(backends)} backends"
    )
    return EXIT_OK


def _check(args: argparse.Namespace, program: str) -> int:
    archs = tuple(args.arch or REGISTRY)
    from moeconf.tools.coverage import DECLARED_UNSUPPORTED

    for arch in archs:  # unknown names fail before anything runs
        if arch in DECLARED_UNSUPPORTED:
            raise UnknownName(f"{arch} is declared unsupported: {DECLARED_UNSUPPORTED[arch]}")
        get_entry(arch)
    for name in args.backend:
        resolve_backend(name)
    checks = tuple(args.check or (*CHECKS, *PARTITION_CHECKS))
    sel = Selection(
        archs=archs,
        backends=tuple(args.backend),
        dtypes=tuple(args.dtype),
        device=args.device,
        cases=tuple(args.case or (*CASE_NAMES, STEPS_CASE)),
        checks=tuple(c for c in checks if c != "config"),
        seed=args.seed,
        program=program,
    )
    records: list[CheckResult] = []
    start = time.perf_counter()
    for group in _groups(sel, audit="config" in checks):
        records.extend(group)
        if not args.quiet and group:
            print(progress_line(group), file=sys.stderr, flush=True)
    wall = time.perf_counter() - start
    text = RENDERERS[args.format](records, wall)
    if args.output:
        try:
            write_atomically(args.output, text)
        except OSError as exc:
            print(f"moeconf: error: cannot write the report to {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_USAGE
        if not args.quiet:
            print(f"report written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if all(r.status == "skip" for r in records):  # e.g. --device cuda without a GPU: green would be a lie
        reason = records[0].message if records else "the selection is empty"
        print(f"moeconf: error: nothing was checked ({reason})", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_FAILED if any(r.status in FAILING for r in records) else EXIT_OK


def _groups(sel: Selection, audit: bool) -> Iterator[list[CheckResult]]:
    """Parity/partition record groups, then (with ``--check config``) one audit group per architecture."""
    if sel.checks:
        yield from run_selection(sel)
    if audit:
        from moeconf.tools.audit import audit_entry, to_check_results

        for arch in sel.archs:
            entry = get_entry(arch)
            yield to_check_results(entry, audit_entry(entry))


def main(argv: Sequence[str] | None = None, program: str = "moeconf") -> int:
    _quiet_transformers()
    use_threads_for_tiny_shapes()
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            return _list(args)
        if args.command == "discover":
            from moeconf.tools.discover import main_discover

            return main_discover(args.args)
        return _check(args, program)
    except UnknownName as exc:
        print(f"moeconf: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def entry_point() -> None:
    sys.exit(main())
