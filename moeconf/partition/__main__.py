"""``python -m moeconf.partition check ...`` on every rank of a torchrun / deepspeed / srun job.

The options are ``moeconf check``'s (the same parser), plus ``--collective-timeout S`` before or after
``check``. Exit codes are ``moeconf check``'s and the same on every rank (every rank judges the same
gathered observations), with one exception: a report that rank 0 cannot write is exit 2 on rank 0 only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from moeconf.backends.base import EnvironmentFault
from moeconf.backends.ep_alltoall import EPAllToAllBackend
from moeconf.backends.partitioned import PartitionedBackend
from moeconf.cli import (
    _error,
    _groups,
    _load_registries,
    _parser,
    _Progress,
    _report_format,
    _selection,
    _stdout_kept_for_the_report,
    _timeout,
    _write,
)
from moeconf.devices import SettingError, check_settings, rank_deadline_s, use_threads_for_tiny_shapes
from moeconf.distributed.torchrun import LaunchEnvError, init_from_env, read_launch_env
from moeconf.harness.engine import Selection
from moeconf.harness.report import (
    EXIT_USAGE,
    RENDERERS,
    ReportPathError,
    check_report_path,
    environment_summary,
    exit_status,
    write_atomically,
)
from moeconf.partition.backend import InGroupBackend, LocalBackend, machine_check, world_refusal
from moeconf.registry import UnknownName
from moeconf.registry.outside import scoped

PROGRAM = "moeconf"
"""Records carry ``moeconf check ...`` repro lines: the same records as the local path, and a record
reruns on one machine with moeconf's own launcher (where a hang shows every rank's stack)."""


def _own_options(argv: Sequence[str]) -> tuple[float | None, list[str]]:
    """``--collective-timeout S`` (taken out; the rest goes to ``moeconf check``'s parser)."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--collective-timeout", type=_timeout, default=None)
    known, rest = own.parse_known_args(list(argv))
    return known.collective_timeout, rest


def _usage(message: str, rank: int | None) -> int:
    if rank in (None, 0):
        _error(message)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else argv
    with scoped():
        try:
            collective_timeout, rest = _own_options(argv)
            args = _parser().parse_args(rest)
            if args.command != "check":
                return _usage(f"moeconf.partition runs `check` only (`moeconf {args.command}` needs no ranks)", None)
            launch = read_launch_env()
            check_settings()
            use_threads_for_tiny_shapes()
            program = _load_registries(args, PROGRAM)
            sel, backends, audit = _selection(args, program)
            multi_rank = {n: b for n, b in backends.items() if isinstance(b, PartitionedBackend | EPAllToAllBackend)}
            wrong = [n for n in backends if n not in multi_rank]
            if wrong:
                return _usage(
                    f"{', '.join(wrong)}: not a multi-rank backend of moeconf (zero3-leaf, zero2-dense, "
                    "fsdp2-dense, ep-alltoall and their controls); run it with `moeconf check`",
                    launch.rank,
                )
            # NOTE: before any rendezvous, from the launcher's WORLD_SIZE: no rank waits for a refusal.
            if sel.world_size is not None and sel.world_size != launch.world_size:
                return _usage(
                    f"--world-size {sel.world_size}: this job's ranks are the launcher's (WORLD_SIZE="
                    f"{launch.world_size}); drop --world-size or launch {sel.world_size} ranks",
                    launch.rank,
                )
            refused = [r for n, b in multi_rank.items() if (r := world_refusal(n, b, launch.world_size))]
            if refused:
                return _usage(refused[0], launch.rank)
            timeout_s = collective_timeout if collective_timeout is not None else rank_deadline_s()
        except (UnknownName, SettingError, ReportPathError, LaunchEnvError) as exc:
            return _usage(str(exc), None)
        return _run(args, sel, multi_rank, audit, launch.rank, timeout_s)


def _run(
    args: argparse.Namespace,
    sel: Selection,
    backends: dict[str, LocalBackend],
    audit: bool,
    rank: int,
    timeout_s: float,
) -> int:
    import torch.distributed as dist

    if sel.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported: it picks then
    # NOTE: before the group forms: a first build of DeepSpeed's op can take minutes, longer than
    # any collective may wait; what each rank finds is shared right after.
    faults: dict[str, str] = {}
    for name, backend in backends.items():
        try:
            machine_check(name, backend)
        except EnvironmentFault as exc:
            faults[name] = f"rank {rank}: {exc}"
    init_from_env(sel.device, timeout_s)
    try:
        world = dist.get_world_size()
        gathered: list[tuple[dict[str, str], str | None] | None] = [None] * world
        target_error = None
        if rank == 0 and args.output:
            try:
                check_report_path(args.output)
            except ReportPathError as exc:
                target_error = str(exc)
        dist.all_gather_object(gathered, (faults, target_error))
        if gathered[0] and gathered[0][1]:
            return _usage(gathered[0][1], rank)
        all_faults: dict[str, str] = {}
        for entry in gathered:
            for name, fault in (entry[0] if entry else {}).items():
                all_faults.setdefault(name, fault)
        in_group = {name: InGroupBackend(b, all_faults.get(name)) for name, b in backends.items()}
        return _check(args, sel, in_group, audit, rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _check(
    args: argparse.Namespace, sel: Selection, backends: dict[str, InGroupBackend], audit: bool, rank: int
) -> int:
    lead = rank == 0
    progress = _Progress(enabled=lead and not args.quiet)
    start = time.perf_counter()
    records = []
    try:
        with _stdout_kept_for_the_report():
            for group in _groups(sel, backends, audit, progress):  # type: ignore[arg-type]
                records.extend(group)
                progress.done(group)
    finally:
        progress.close()
    code = exit_status(records)
    if not lead:
        return code
    text = RENDERERS[_report_format(args)](records, time.perf_counter() - start)
    if args.output:
        try:
            write_atomically(args.output, text)
        except OSError as exc:
            _error(f"cannot write the report to {args.output}: {exc.strerror or exc}")
            return EXIT_USAGE
        if not args.quiet:
            _write(sys.stderr, f"report written to {args.output}\n")
    else:
        _write(sys.stdout, text)
    environment = environment_summary(records)
    if environment:
        _write(sys.stderr, f"moeconf: {environment}\n")
    if records and all(r.status == "skip" for r in records):
        _error(f"nothing was checked ({records[0].message})")
    elif not records:
        _error("nothing was checked (the selection is empty)")
    return code


if __name__ == "__main__":
    sys.exit(main())
