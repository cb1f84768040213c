"""Command line: ``moeconf list | check | discover | bench`` (also ``python -m moeconf``).

Exit codes (``moeconf.harness.status``, ``docs/reliability.md``): 0 every record passed (xfail counts
as passed); 1 a record blames the code under test (fail/error); 2 a usage or configuration error, an
environment fault (a ``setup`` record) or a run where nothing was checked; 130/143 interrupted by
SIGINT/SIGTERM. Every refusal is one line ``moeconf: error: ...`` on stderr, never a traceback, and
every input (options, ``MOECONF_*`` variables, ``--output``, names) is checked before any work starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, NoReturn

from moeconf.backends import Backend, resolve_backend, with_world_size
from moeconf.devices import DEVICES, DTYPES, SettingError, check_settings, use_threads_for_tiny_shapes
from moeconf.harness.cases import CASE_NAMES, CASE_SEED_STRIDE
from moeconf.harness.checks import CHECKS
from moeconf.harness.engine import (
    DEFAULT_CONFIGS,
    DEFAULT_TIMEOUT_S,
    CheckResult,
    Selection,
    UnknownConfig,
    check_selectors,
    config_variants,
    run_variant,
)
from moeconf.harness.partition_checks import PARTITION_CHECKS, STEPS_CASE
from moeconf.harness.report import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    RENDERERS,
    ReportPathError,
    check_report_path,
    environment_summary,
    exit_status,
    progress_line,
    start_line,
    write_atomically,
)
from moeconf.registry import REGISTRY, UnknownName, all_entries, get_entry
from moeconf.registry.outside import load_entry_points, load_registry, outside_entries, scoped
from moeconf.registry.versions import absent_reason, runs_on

if TYPE_CHECKING:
    from rich.console import Console
    from rich.status import Status

DEFAULT_BACKENDS = ("hf-eager", "hf-grouped-mm", "hf-batched-mm")
MAX_SEED = min(2**63 - 1, (2**64 - 1 - 2**16) // CASE_SEED_STRIDE)
"""Largest ``--seed``: token streams are seeded ``seed * CASE_SEED_STRIDE + salt`` and torch takes
seeds below 2**64. (2**63 - 1 once the harness reduces derived seeds modulo 2**64.)"""
FORMAT_BY_SUFFIX = {".json": "json", ".xml": "junit"}
"""``--output r.json`` without ``--format`` writes JSON (the text report's notes rely on this)."""


# --- argument parsing: every value is checked here, before any work ------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with moeconf's one-line refusal (argparse prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"moeconf: error: {message} (see {self.prog} --help)\n")


def _seed(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: expected a whole number") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seed {text} out of range: 0 <= seed <= {MAX_SEED}")
    return value


def _config_selector(text: str) -> str:
    try:
        check_selectors([text])
    except UnknownConfig as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("unknown --config ")) from None
    return text


MIN_WORLD, MAX_WORLD = 2, 16
"""``--world-size`` bounds: one rank partitions nothing; local ranks beyond 16 only oversubscribe the
machine (a bigger job runs under torchrun: ``python -m moeconf.partition``)."""


def _world_size(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid world size {text!r}: expected a whole number") from None
    if not MIN_WORLD <= value <= MAX_WORLD:
        raise argparse.ArgumentTypeError(f"world size {text} out of range: {MIN_WORLD} <= N <= {MAX_WORLD}")
    return value


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r}: expected seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r}: expected a positive, finite number of seconds")
    return value


REGISTRY_HELP = (
    "package.module:attr holding outside architectures (an ArchEntry or an iterable of them), "
    "checked like the built-in ones; repeatable"
)


def _add_registry(parser: argparse.ArgumentParser, dest: str = "registry") -> None:
    parser.add_argument("--registry", action="append", default=[], dest=dest, metavar="MODULE:ATTR", help=REGISTRY_HELP)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moeconf", description="Conformance gate for Mixture-of-Experts layers.")
    # NOTE: also before the subcommand, with its own dest (a subparser's defaults would overwrite a
    # shared one): repro lines are "<program> check ...", so `moeconf --registry X check ...` is the
    # form that lets a repro of an outside architecture carry its registry.
    _add_registry(parser, dest="registry_first")
    sub = parser.add_subparsers(dest="command", required=True)

    lst = sub.add_parser("list", help="architectures x backends with their status")
    _add_registry(lst)
    lst.add_argument("--backend", nargs="+", default=list(DEFAULT_BACKENDS), help="backends to show")
    lst.add_argument("--device", default="cpu", choices=DEVICES)
    lst.add_argument("--format", default="text", choices=("text", "json"))

    chk = sub.add_parser("check", help="run the parity checks against the float64 reference")
    chk.add_argument("--arch", nargs="+", metavar="A", help="model types (default: every registered one)")
    _add_registry(chk)
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
    chk.add_argument(
        "--config",
        nargs="+",
        type=_config_selector,
        metavar="KIND|NAME",
        help="config samples: kinds tiny, default (the config class's defaults), published (released "
        "checkpoints), hypothesis (seeded variants), or sample names (published:qwen3-30b-a3b, hypothesis:2) "
        f"(default: {' '.join(DEFAULT_CONFIGS)})",
    )
    chk.add_argument("--seed", type=_seed, default=0, help=f"0..{MAX_SEED} (default 0)")
    chk.add_argument(
        "--world-size",
        type=_world_size,
        metavar="N",
        help=f"ranks of the multi-rank backends, {MIN_WORLD}..{MAX_WORLD} (default: 2; ep-alltoall-4: 4)",
    )
    chk.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"seconds one backend call may take before it is an error (default {DEFAULT_TIMEOUT_S:g})",
    )
    chk.add_argument(
        "--format",
        choices=tuple(RENDERERS),
        help="report format (default: from --output's suffix, .json -> json, .xml -> junit; else text)",
    )
    chk.add_argument(
        "--output",
        type=Path,
        help="write the report here instead of stdout: whole or not at all, checked before the run",
    )
    chk.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    disc = sub.add_parser("discover", help="propose a registry entry for a transformers MoE model type")
    disc.add_argument("model_type", metavar="MODEL_TYPE", help="a transformers model type (registered or not)")
    disc.add_argument("--format", default="text", choices=("text", "json"))
    disc.add_argument(
        "--config-kwargs",
        type=_json_object,
        metavar="JSON",
        help="tiny config keyword arguments instead of the generic shrink (a JSON object)",
    )
    disc.add_argument("--seed", type=_seed, default=0, help=f"0..{MAX_SEED} (default 0)")

    from moeconf.bench.cli import add_bench_arguments

    bench = sub.add_parser("bench", help="time backends against the roofline measured in the same run")
    add_bench_arguments(bench)
    _add_registry(bench)
    return parser


def _json_object(text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _unique(values: Sequence[str] | None) -> tuple[str, ...] | None:
    """``values`` without repeats, in the order given (``--arch mixtral mixtral`` runs mixtral once)."""
    return None if values is None else tuple(dict.fromkeys(values))


# --- output streams: a reader that goes away (``| head``) is not an error of the run -------------


def _silence(stream: IO[str]) -> None:
    """Point ``stream``'s descriptor at /dev/null, so later writes and the flush at exit do not
    raise again (the recipe of the Python docs for SIGPIPE)."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def _write(stream: IO[str], text: str) -> bool:
    """Write and flush; False (and the stream silenced) when its reader has gone away."""
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:
        _silence(stream)
        return False
    return True


@contextlib.contextmanager
def _stdout_kept_for_the_report() -> Iterator[None]:
    """While checks run, whatever else writes to stdout goes to stderr, so that stdout carries the
    report and nothing but the report (``--format json | jq`` must parse).

    NOTE: DeepSpeed logs a warning to stdout on import, backends print, native code writes to fd 1:
    so both ``sys.stdout`` and, where it is the real stdout, file descriptor 1 are diverted."""
    sys.stdout.flush()
    saved: int | None = None
    with contextlib.suppress(OSError, ValueError):  # no real fd 1 (pytest's capture): Python level only
        if sys.stdout.fileno() == 1:
            saved = os.dup(1)
            os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()  # what was buffered for fd 1 during the run goes to stderr
            os.dup2(saved, 1)
            os.close(saved)


def _error(message: str) -> None:
    _write(sys.stderr, f"moeconf: error: {message}\n")


class _Progress:
    """Progress on stderr: a line before each (arch, backend, dtype) starts, so a stuck run says what
    it is stuck in, and one after each case. On a terminal a ``rich`` status line shows the current
    unit and its elapsed time instead of the start lines; elsewhere (CI logs, pipes) plain lines."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._status: Status | None = None
        self._console: Console | None = None
        if enabled and sys.stderr.isatty():
            try:
                from rich.console import Console
            except ImportError:  # rich comes with transformers 5; plain lines without it
                return
            self._console = Console(stderr=True, highlight=False)
            self._status = self._console.status("starting", spinner="dots")
            self._status.start()

    def start(self, arch: str, backend: str, dtype: str, device: str) -> None:
        if not self.enabled:
            return
        if self._status is not None:
            self._status.update(f"running {arch} {backend} {dtype} {device} (since {time.strftime('%H:%M:%S')})")
        elif not _write(sys.stderr, start_line(arch, backend, dtype, device) + "\n"):
            self.enabled = False

    def done(self, group: Sequence[CheckResult]) -> None:
        if not self.enabled or not group:
            return
        if self._console is not None:
            self._console.print(progress_line(group), markup=False, soft_wrap=True)
        elif not _write(sys.stderr, progress_line(group) + "\n"):
            self.enabled = False

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


# --- interruption: Ctrl-C and SIGTERM end in one line ---------------------------------------------


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; a ``KeyboardInterrupt`` so that every ``finally`` (the multi-rank
    launcher's cleanup included) and the engine's pass-through of ``KeyboardInterrupt`` apply."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    # NOTE: further signals are ignored from here on: a second Ctrl-C must not cut short the
    # cleanup the first one started (killing rank processes is bounded: SIGKILL).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Interrupted`` while ``main`` runs (handlers restored after, since
    tests call ``main`` in-process). Signal handlers can only be set from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # NOTE: a signal ignored by whoever started us (a background job of a script, nohup) stays
    # ignored, as Python itself does for SIGINT.
    previous = {
        sig: signal.signal(sig, _raise_interrupted)
        for sig in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(sig) is not signal.SIG_IGN
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class _RunState:
    """What an interruption message needs to say."""

    checking: bool = False
    records: list[CheckResult] = field(default_factory=list)
    destination: str = "stdout"
    written: bool = False


def _interrupted_line(signum: int, state: _RunState) -> str:
    name = signal.Signals(signum).name
    if not state.checking:
        return f"moeconf: interrupted by {name}"
    if state.written:
        where = f"the report was written to {state.destination}"
    else:
        where = f"no report written to {state.destination} (a report is written whole or not at all)"
    return f"moeconf: interrupted by {name}: {len(state.records)} records checked; {where}"


# --- commands --------------------------------------------------------------------------------------


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns as wide as their widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [" ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _list(args: argparse.Namespace) -> int:
    backends = {name: resolve_backend(name) for name in _unique(args.backend) or ()}
    from moeconf.tools.coverage import DECLARED_UNSUPPORTED

    rows = []
    entries = all_entries()
    for entry in entries.values():
        statuses = {}
        for name, backend in backends.items():
            reason = absent_reason(entry.model_type) or backend.supports(entry, "fp32", args.device)
            declared = [x for x in entry.expectations if x.backend in (None, name)]
            if reason is not None:
                statuses[name] = {"status": "unsupported", "reason": reason}
            elif declared:
                statuses[name] = {"status": declared[0].status, "reason": declared[0].reason}
            else:
                statuses[name] = {"status": "supported", "reason": ""}
        rows.append(
            {
                "model_type": entry.model_type,
                "block_class": entry.block_class,
                "transformers": runs_on(entry.model_type),  # the releases it runs on (">=5.7.0")
                "backends": statuses,
            }
        )
    for model_type, reason in sorted(DECLARED_UNSUPPORTED.items()):
        if model_type in entries:  # an outside entry fills the gap
            continue
        unsupported = {"status": "unsupported", "reason": reason}
        rows.append(
            {
                "model_type": model_type,
                "block_class": "-",
                "transformers": "",
                "backends": dict.fromkeys(backends, unsupported),
            }
        )
    if args.format == "json":
        _write(sys.stdout, json.dumps({"architectures": rows}, indent=1) + "\n")
        return EXIT_OK
    table = [["model_type", "block", "transformers", *backends]] + [
        [
            row["model_type"],
            row["block_class"],
            row["transformers"] or "-",
            *(row["backends"][n]["status"] for n in backends),
        ]
        for row in rows
    ]
    notes = [
        f"- {row['model_type']} / {n}: {s['status']}: {s['reason']}"
        for row in rows
        for n, s in row["backends"].items()
        if s["reason"]
    ]
    lines = _columns(table) + (["", "notes:", *notes] if notes else [])
    outside = len(entries) - len(REGISTRY)
    unsupported_types = len(rows) - len(entries)
    lines.append(
        f"\n{len(rows)} model types ({len(REGISTRY)} registered, "
        + (f"{outside} from outside registries, " if outside else "")
        + f"{unsupported_types} declared unsupported), {len(backends)} backends"
    )
    _write(sys.stdout, "\n".join(lines) + "\n")
    return EXIT_OK


def _selection(args: argparse.Namespace, program: str) -> tuple[Selection, dict[str, Backend], bool]:
    """The run ``args`` ask for, its backends loaded once, and whether the config audit runs; every
    name is checked (``UnknownName``) before anything runs."""
    archs = _unique(args.arch) or tuple(all_entries())
    from moeconf.tools.coverage import DECLARED_UNSUPPORTED

    outside = outside_entries()
    for arch in archs:
        if arch in DECLARED_UNSUPPORTED and arch not in outside:
            raise UnknownName(f"{arch} is declared unsupported: {DECLARED_UNSUPPORTED[arch]}")
        get_entry(arch)
    world_size = getattr(args, "world_size", None)
    backends = {name: with_world_size(resolve_backend(name), world_size) for name in _unique(args.backend) or ()}
    checks = _unique(args.check) or (*CHECKS, *PARTITION_CHECKS)
    selection = Selection(
        archs=archs,
        backends=tuple(backends),
        dtypes=_unique(args.dtype) or (),
        device=args.device,
        cases=_unique(args.case) or (*CASE_NAMES, STEPS_CASE),
        checks=tuple(c for c in checks if c != "config"),
        seed=args.seed,
        timeout_s=args.timeout,
        world_size=world_size,
        configs=_unique(args.config) or DEFAULT_CONFIGS,
        program=program,
    )
    return selection, backends, "config" in checks


def _groups(
    sel: Selection, backends: dict[str, Backend], audit: bool, progress: _Progress
) -> Iterator[list[CheckResult]]:
    """Record groups in ``run_selection``'s order (arch, dtype, backend, case), one backend at a
    time so that progress can name each (arch, backend, dtype) before it runs; then, with
    ``--check config``, one audit group per architecture."""
    if sel.checks:
        for arch in sel.archs:
            for sample, entry in config_variants(sel, get_entry(arch)):
                label = arch if sample.kind == "tiny" else f"{arch} @ {sample.name}"
                for dtype in sel.dtypes:
                    for name, backend in backends.items():
                        progress.start(label, name, dtype, sel.device)
                        yield from run_variant(sel, entry, {name: backend}, dtype)
    if audit:
        from moeconf.tools.audit import audit_entry, to_check_results

        for arch in sel.archs:
            progress.start(arch, "config audit", "-", sel.device)
            entry = get_entry(arch)
            yield to_check_results(entry, audit_entry(entry))


def _report_format(args: argparse.Namespace) -> str:
    if args.format:
        return str(args.format)
    return FORMAT_BY_SUFFIX.get(args.output.suffix.lower(), "text") if args.output else "text"


def _check(args: argparse.Namespace, program: str, state: _RunState) -> int:
    target = check_report_path(args.output) if args.output else None  # first: before any work
    state.checking, state.destination = True, str(args.output) if args.output else "stdout"
    sel, backends, audit = _selection(args, program)
    progress = _Progress(enabled=not args.quiet)
    start = time.perf_counter()
    try:
        with _stdout_kept_for_the_report():
            for group in _groups(sel, backends, audit, progress):
                state.records.extend(group)
                progress.done(group)
    finally:
        progress.close()
    records = state.records
    text = RENDERERS[_report_format(args)](records, time.perf_counter() - start)
    code = exit_status(records)
    if target is not None:
        try:
            write_atomically(target, text)
        except OSError as exc:
            _error(f"cannot write the report to {args.output}: {exc.strerror or exc}")
            return EXIT_USAGE
        state.written = True
        if not args.quiet:
            _write(sys.stderr, f"report written to {args.output}\n")
    else:
        # NOTE: a reader that stops early (`| head`) does not change the verdict: the run is complete.
        state.written = _write(sys.stdout, text)
    environment = environment_summary(records)
    if environment:
        _write(sys.stderr, f"moeconf: {environment}\n")
    if records and all(r.status == "skip" for r in records):  # e.g. --device cuda without a GPU
        _error(f"nothing was checked ({records[0].message})")
    elif not records:
        _error("nothing was checked (the selection is empty)")
    return code


def _quiet_transformers() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _load_registries(args: argparse.Namespace, program: str) -> str:
    """Register the installed ``moeconf.architectures`` entry points and every ``--registry``
    (``RegistryLoadError``: a usage error, before any work); the program prefix of repro lines, which
    carries the ``--registry`` options so that a repro of an outside architecture finds it."""
    specs = tuple(dict.fromkeys([*args.registry_first, *getattr(args, "registry", [])]))
    if args.command not in ("list", "check", "bench") and not specs:
        return program  # discover works on transformers model types, not registry entries
    load_entry_points()
    for spec in specs:
        load_registry(spec)
    return " ".join([program, *(f"--registry {shlex.quote(spec)}" for spec in specs)])


def _run(argv: Sequence[str] | None, program: str, state: _RunState) -> int:
    args = _parser().parse_args(argv)
    check_settings()  # MOECONF_* variables, before torch is configured or anything is imported
    use_threads_for_tiny_shapes()
    program = _load_registries(args, program)
    if args.command == "list":
        return _list(args)
    if args.command == "discover":
        from moeconf.tools.discover import run_discover

        return run_discover(args.model_type, fmt=args.format, config_kwargs=args.config_kwargs, seed=args.seed)
    if args.command == "bench":
        from moeconf.bench.cli import run_bench

        return run_bench(args, program)
    return _check(args, program, state)


def main(argv: Sequence[str] | None = None, program: str = "moeconf") -> int:
    """The command line; returns the exit code (argparse's own refusals exit 2 via ``SystemExit``)."""
    _quiet_transformers()
    state = _RunState()
    with _signals_as_interrupts(), scoped():  # one call's --registry does not outlive it
        try:
            return _run(argv, program, state)
        except (UnknownName, SettingError, ReportPathError) as exc:
            _error(str(exc))
            return EXIT_USAGE
        except Interrupted as exc:
            _write(sys.stderr, _interrupted_line(exc.signum, state) + "\n")
            return 128 + exc.signum
        except KeyboardInterrupt:  # Python's own handler: main() was called outside the main thread
            _write(sys.stderr, _interrupted_line(signal.SIGINT, state) + "\n")
            return 128 + signal.SIGINT
        except BrokenPipeError:  # a write not made through _write (e.g. by discover): the docs' recipe
            _silence(sys.stdout)
            return EXIT_FAILED


def entry_point() -> None:
    code = main()
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM) and threading.current_thread() is threading.main_thread():
        # NOTE: an interrupted process stays deaf to further signals until it has exited: a second
        # Ctrl-C during interpreter shutdown would otherwise print a traceback from an exit hook.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)
