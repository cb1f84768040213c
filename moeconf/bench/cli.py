"""``moeconf bench``: options (``add_bench_arguments``) and the run (``run_bench``).

Exit codes: 0 every figure timed (or over budget, or unsupported here) and no regression; 1 a
regression against ``--compare``, or a ``not_timed`` / ``error`` row; 2 a usage error (one line: an
unknown name, a bad number, an unwritable path, an unreadable baseline, nothing that could be timed).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moeconf.backends import BUILTIN, resolve_backend
from moeconf.backends.base import is_multi_rank
from moeconf.bench.compare import DEFAULT_THRESHOLD, BaselineError, compare, load_report
from moeconf.bench.flops import Pass
from moeconf.bench.presets import DEFAULT_TINY_ARCH, PRESETS, TINY, PresetError, check_sized_entry
from moeconf.bench.report import environment, to_json, to_text, write_atomically
from moeconf.bench.routing import ROUTINGS
from moeconf.bench.rows import FAILING_ROWS, BenchRow
from moeconf.bench.runner import BenchPlan, Progress, default_threads, run_plan, target_of
from moeconf.devices import DEVICES, DTYPES, device_available
from moeconf.registry import UnknownName, get_entry

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PASSES: tuple[Pass, ...] = ("fwd", "fwdbwd")
FORMATS = ("text", "json")
DEFAULT_TOKENS = {"cpu": (1, 64, 512)}
DEFAULT_TOKENS_ACCELERATOR = (1, 64, 2048, 8192)
DEFAULT_REPEAT = {"cpu": 5}
DEFAULT_WARMUP = {"cpu": 1}
DEFAULT_BUDGET_S = 600.0


class UsageError(ValueError):
    """A bad command line (exit 2, one line)."""


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``moeconf bench``; values are validated by ``run_bench`` (one-line usage errors)."""
    presets = ", ".join(PRESETS)
    parser.add_argument("--arch", nargs="+", metavar="A", help="model types (default: each preset's own)")
    parser.add_argument(
        "--backend",
        nargs="+",
        metavar="B",
        help="backend names, entry points or package.module:attr (default: the single-process built-ins that "
        "run on the device; multi-rank ones, e.g. zero3-leaf zero2-dense fsdp2-dense, when named)",
    )
    parser.add_argument(
        "--preset",
        nargs="+",
        metavar="P",
        help=f"{presets} (default: tiny on CPU, the checkpoint presets on accelerators)",
    )
    parser.add_argument(
        "--tokens", nargs="+", metavar="N", help="token counts (default: CPU 1 64 512; accelerators 1 64 2048 8192)"
    )
    parser.add_argument("--routing", nargs="+", metavar="R", help=f"{' | '.join(ROUTINGS)} (default: natural)")
    parser.add_argument("--pass", nargs="+", dest="passes", metavar="fwd|fwdbwd", help="default: fwd fwdbwd")
    parser.add_argument("--dtype", nargs="+", metavar="fp32|bf16", help="default: fp32 on CPU, bf16 elsewhere")
    parser.add_argument("--device", default="cpu", metavar="cpu|cuda|npu")
    parser.add_argument("--repeat", metavar="N", help="timed samples per figure (default: CPU 5, accelerators 20)")
    parser.add_argument("--warmup", metavar="N", help="warm-up calls before the samples (default: CPU 1, else 3)")
    parser.add_argument(
        "--scale",
        default="1",
        metavar="F",
        help="multiply hidden/intermediate widths by F (E, k and groups kept; default 1)",
    )
    parser.add_argument(
        "--budget",
        default=str(DEFAULT_BUDGET_S),
        metavar="S",
        help=f"seconds per figure (default {DEFAULT_BUDGET_S:g}); past it a figure is reported over_budget",
    )
    parser.add_argument(
        "--threads", metavar="N", help="torch intra-op threads (default: $MOECONF_THREADS, else every available core)"
    )
    parser.add_argument("--seed", default="0", metavar="N", help="seed of parameters, inputs and routing")
    parser.add_argument("--format", default="text", metavar="text|json")
    parser.add_argument("--output", type=Path, metavar="PATH", help="write the report here (whole or not at all)")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write throughput / ratio / memory PNGs here")
    parser.add_argument("--compare", type=Path, metavar="BASELINE.json", help="exit 1 on a regression against it")
    parser.add_argument(
        "--threshold",
        default=str(DEFAULT_THRESHOLD),
        metavar="X",
        help=f"relative slowdown tolerated by --compare (default {DEFAULT_THRESHOLD:g}; the runs' noise widens it)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _number(text: str, option: str, kind: type, minimum: float, strict: bool = False) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if math.isnan(value) or value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise UsageError(f"{option}: {text} must be {bound}")
    return value


def _choices(
    values: Sequence[str] | None, valid: Sequence[str], option: str, default: Sequence[str]
) -> tuple[str, ...]:
    chosen = tuple(values) if values else tuple(default)
    unknown = [v for v in chosen if v not in valid]
    if unknown:
        raise UsageError(f"{option}: unknown {', '.join(unknown)}; valid: {', '.join(valid)}")
    return tuple(dict.fromkeys(chosen))


def default_backends(device: str) -> tuple[str, ...]:
    """Single-process built-ins that run (and are timed) on ``device``."""
    names = []
    for name in BUILTIN:
        backend = resolve_backend(name)
        if is_multi_rank(backend) or device not in backend.devices:
            continue
        if name == "npu-gmm" and device != "npu":
            continue
        names.append(name)
    return tuple(names)


def _targets(archs: Sequence[str] | None, presets: Sequence[str] | None, device: str) -> tuple[tuple[str, str], ...]:
    """``(arch, preset)`` pairs from ``--arch`` / ``--preset`` (see ``--help``)."""
    for arch in archs or ():
        get_entry(arch)  # UnknownName lists the registered types
    named = [p for p in PRESETS.values() if p.name != TINY]
    if presets:
        _choices(presets, list(PRESETS), "--preset", ())
        chosen = [PRESETS[p] for p in dict.fromkeys(presets)]
    elif archs:
        chosen = [PRESETS[TINY]] if device == "cpu" else [p for p in named if p.arch in archs] or [PRESETS[TINY]]
    else:
        chosen = [PRESETS[TINY]] if device == "cpu" else named
    if not archs:
        return tuple((p.arch or DEFAULT_TINY_ARCH, p.name) for p in chosen)
    pairs = [(a, p.name) for a in dict.fromkeys(archs) for p in chosen if p.arch in (None, a)]
    for preset in chosen:
        if preset.arch is not None and preset.arch not in archs:
            raise UsageError(
                f"--preset {preset.name} is sized for {preset.arch}; add --arch {preset.arch} or drop --arch"
            )
    return tuple(pairs)


@dataclass(frozen=True)
class Options:
    """The validated command line."""

    plan: BenchPlan
    format: str
    output: Path | None
    plot: Path | None
    baseline: Path | None
    threshold: float
    quiet: bool


def _writable(path: Path, what: str, folder: bool = False) -> None:
    target = path if folder else path.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{what}: cannot create {target}: {exc.strerror or exc}") from None
    if not os.access(target, os.W_OK):
        raise UsageError(f"{what}: {target} is not writable")


def parse_options(args: argparse.Namespace, program: str) -> Options:
    """Validate every option before anything runs (``UsageError``/``UnknownName``/``PresetError``)."""
    device = _choices([args.device], DEVICES, "--device", ())[0]
    if not device_available(device):
        raise UsageError(f"--device {device}: no {device} device is visible here")
    accelerator = device != "cpu"
    tokens = tuple(int(_number(t, "--tokens", int, 1)) for t in (args.tokens or ()))
    tokens = tokens or DEFAULT_TOKENS.get(device, DEFAULT_TOKENS_ACCELERATOR)
    backends = tuple(dict.fromkeys(args.backend or default_backends(device)))
    for name in backends:
        resolve_backend(name)
    plan = BenchPlan(
        targets=_targets(args.arch, args.preset, device),
        backends=backends,
        dtypes=_choices(args.dtype, list(DTYPES), "--dtype", ("bf16",) if accelerator else ("fp32",)),
        passes=_choices(args.passes, PASSES, "--pass", PASSES),  # type: ignore[arg-type]
        routings=_choices(args.routing, ROUTINGS, "--routing", ("natural",)),  # type: ignore[arg-type]
        tokens=tuple(sorted(set(tokens))),
        device=device,
        repeat=int(_number(args.repeat or str(DEFAULT_REPEAT.get(device, 20)), "--repeat", int, 1)),
        warmup=int(_number(args.warmup or str(DEFAULT_WARMUP.get(device, 3)), "--warmup", int, 0)),
        budget_s=_number(args.budget, "--budget", float, 0, strict=True),
        scale=_number(args.scale, "--scale", float, 0, strict=True),
        threads=int(_number(args.threads, "--threads", int, 1)) if args.threads else default_threads(),
        seed=int(_number(args.seed, "--seed", int, 0)),
        program=program,
    )
    for arch, preset in plan.targets:  # sizes that cannot reach the block fail here, not after an hour
        check_sized_entry(target_of(arch, preset, plan.scale).entry)
    fmt = _choices([args.format], FORMATS, "--format", ())[0]
    if args.output:
        _writable(args.output, "--output")
    if args.plot:
        _writable(args.plot, "--plot", folder=True)
    threshold = _number(args.threshold, "--threshold", float, 0)
    return Options(plan, fmt, args.output, args.plot, args.compare, threshold, args.quiet)


def _error(program: str, message: str) -> int:
    print(
        f"{program} bench: error: {message.strip().splitlines()[0] if message.strip() else 'usage error'}",
        file=sys.stderr,
    )
    return EXIT_USAGE


def run_bench(args: argparse.Namespace, program: str = "moeconf") -> int:
    """Run ``moeconf bench`` as parsed by a parser that ``add_bench_arguments`` set up; the exit code."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        options = parse_options(args, program)
        baseline = load_report(options.baseline) if options.baseline else None
    except (UsageError, UnknownName, PresetError, BaselineError) as exc:
        return _error(program, str(exc))
    plan = options.plan
    progress = Progress(plan.total_rows(), (lambda _line: None) if options.quiet else None)
    start = time.perf_counter()
    rows: list[BenchRow] = list(run_plan(plan, progress))
    wall = time.perf_counter() - start
    env = environment(plan.device, plan.threads, sys.argv)
    comparison = None
    if baseline is not None:
        comparison = compare([r.to_dict() for r in rows], baseline[1], options.threshold, env, baseline[0])
        for line in comparison.lines():
            print(line, file=sys.stderr)
    if options.format == "json":
        text = to_json(rows, env, wall, comparison.to_dict() if comparison else None)
    else:
        text = to_text(rows, env, wall, comparison.lines() if comparison else ())
    try:
        if options.output:
            write_atomically(options.output, text)
            if not options.quiet:
                print(f"report written to {options.output}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        if options.plot:
            from moeconf.bench.plot import write_plots

            for path in write_plots(rows, options.plot):
                if not options.quiet:
                    print(f"plot written to {path}", file=sys.stderr)
    except OSError as exc:
        return _error(program, f"cannot write {exc.filename or 'the report'}: {exc.strerror or exc}")
    if all(r.status == "unsupported" for r in rows):
        return _error(program, f"nothing could be timed ({rows[0].message if rows else 'empty selection'})")
    if any(r.status in FAILING_ROWS for r in rows) or (comparison is not None and comparison.regressions):
        return EXIT_FAILED
    return EXIT_OK


def main(argv: Sequence[str] | None = None, program: str = "moeconf") -> int:
    """``python -m moeconf.bench``: the same options without the subcommand."""
    parser = argparse.ArgumentParser(prog=f"{program} bench", description="MoE performance benchmark and gate.")
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv), program)
