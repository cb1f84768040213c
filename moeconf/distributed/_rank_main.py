"""Entry point of one rank started by :func:`moeconf.distributed.run_ranks`.

Invoked as ``python -m moeconf.distributed._rank_main RUN_DIR``. The parent
sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``/... in the
environment and writes ``RUN_DIR/payload.pkl``. This process:

1. installs a ``faulthandler`` stack dump on ``SIGUSR1`` into
   ``RUN_DIR/rank<R>.stack.txt`` (first thing, before the slow ``torch``
   import, so even a rank stuck importing can be diagnosed);
2. asks the kernel to SIGKILL it if the parent dies (no orphans when the
   parent itself is SIGKILLed and cannot run its cleanup);
3. calls ``torch.distributed.init_process_group`` (unless backend is None),
   runs ``fn(*args)`` and atomically writes ``RUN_DIR/rank<R>.result.pkl``;
4. tears the process group down (best effort).

With ``--pool`` (a :class:`moeconf.distributed.launcher.RankPool`'s rank) step 3 repeats: the rank
reads job numbers from stdin, runs ``RUN_DIR/job<N>.pkl`` and writes
``RUN_DIR/rank<R>.job<N>.result.pkl``, initialising the process group before its first job and
keeping it up. A job that raises ends the rank as in a one-shot run (its peers may wait for it in a
collective: the parent then kills the whole pool). EOF on stdin (the pool closed, or the parent
died) ends it.

Only the standard library (and the stdlib-only launcher module) is imported
at module level on purpose.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

# The launcher imports only the standard library, so this import keeps the
# pre-faulthandler window short.
from moeconf.distributed.launcher import (
    EXIT_BAD_INVOCATION,
    EXIT_FN_FAILED,
    EXIT_OK,
    POOL_FLAG,
    job_path,
    job_result_path,
    payload_path,
    result_path,
    stack_path,
)

_PR_SET_PDEATHSIG = 1

# Keep the stack file object alive for the life of the process: faulthandler
# only stores its file descriptor.
_stack_file: IO[str] | None = None


def _install_stack_dump(path: Path) -> None:
    global _stack_file
    _stack_file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - must stay open
    faulthandler.register(signal.SIGUSR1, file=_stack_file, all_threads=True)


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG(SIGKILL): a SIGKILLed parent can't clean up after us."""
    expected_parent = int(os.environ.get("MOECONF_PARENT_PID", "0") or 0)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux / no prctl: the parent's own cleanup still applies
    # The parent may have died before prctl took effect.
    if expected_parent and os.getppid() != expected_parent:
        os._exit(EXIT_BAD_INVOCATION)


def resolve_fn(spec: str, fallback_file: str | None = None) -> Callable[..., Any]:
    """Import ``"package.module:attr.path"`` and return the attribute.

    If the module cannot be imported by name but the parent told us its file
    (e.g. pytest's ``--import-mode=importlib`` gives test modules names that
    are not on ``sys.path``), load it from that file under the same name, so
    pickled args/results referring to it still resolve.
    """
    import importlib
    import importlib.util

    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"rank function spec must look like 'pkg.module:attr', got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError:
        if not fallback_file:
            raise
        file_spec = importlib.util.spec_from_file_location(module_name, fallback_file)
        if file_spec is None or file_spec.loader is None:
            raise
        obj = importlib.util.module_from_spec(file_spec)
        sys.modules[module_name] = obj
        file_spec.loader.exec_module(obj)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec!r} resolved to non-callable {obj!r}")
    return obj


def _write_result(path: Path, record: dict[str, Any]) -> None:
    """Write atomically so the parent never unpickles a half-written file."""
    tmp = path.with_suffix(".tmp")
    try:
        data = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - any pickling failure of user data
        data = pickle.dumps(
            {
                "kind": "exception",
                "phase": "pickle-result",
                "type": type(exc).__name__,
                "text": "return value of the rank function is not picklable:\n"
                + "".join(traceback.format_exception(exc)),
                "addr_in_use": False,
            }
        )
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _exception_record(exc: BaseException, phase: str) -> dict[str, Any]:
    text = "".join(traceback.format_exception(exc))
    return {
        "kind": "exception",
        "phase": phase,
        "type": type(exc).__name__,
        "text": text,
        # Lets the parent retry with another port when the picked one was
        # grabbed between "bind 0 / close" and the TCPStore's own bind.
        "addr_in_use": phase == "init" and ("EADDRINUSE" in text or "ddress already in use" in text),
    }


def _init_process_group(backend: str, timeout_s: float) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    # NOTE: NCCL/HCCL need the rank's own device selected before the group forms, or every rank
    # lands on device 0; ranks are local, so the rank is the device index.
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if backend == "nccl":
        import torch

        torch.cuda.set_device(local_rank)
    elif backend == "hccl":
        import torch
        import torch_npu  # type: ignore[import-not-found]  # noqa: F401  (registers torch.npu and hccl)

        torch.npu.set_device(local_rank)  # type: ignore[attr-defined]
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def _teardown(backend: str | None) -> None:
    """Barrier then destroy, so rank 0 (which hosts the TCPStore) does not
    exit while a peer still talks to the store. Best effort only: the result
    is already written, and a hang here is caught by the parent's watchdog."""
    if backend is None:
        return
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort, see docstring
        traceback.print_exc()


def _flush_and_exit(code: int) -> None:
    """Exit without atexit hooks: after a failure, library hooks (gloo, DeepSpeed)
    may block on peers that will never answer."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _between_jobs() -> None:
    """Free what the finished job left (engines, optimizer state, hooks on its modules) before the
    next one starts.

    What stays on purpose: the process group and DeepSpeed's cached groups
    (``deepspeed.utils.groups``: they describe the world, which is the same for every job; making
    new ones would cost a collective per job), imported modules and the accelerator choice.
    ``set_z3_leaf_modules`` marks live on the module objects, and every job builds fresh modules.
    Every job seeds torch itself (``rank_job.run_job``)."""
    import gc

    gc.collect()


def _serve(run_dir: Path, rank: int, fn_file_hint: str | None, backend: str | None, pg_timeout_s: float) -> None:
    """A pool rank's loop: one job per line on stdin until EOF."""
    initialised = False
    while True:
        line = sys.stdin.readline()
        if not line:
            return  # EOF: the pool was closed or the parent is gone
        job_no = int(line)
        out = job_result_path(run_dir, rank, job_no)
        phase = "import"
        try:
            with open(job_path(run_dir, job_no), "rb") as fh:
                fn_spec, fn_file, args_blob = pickle.load(fh)
            fn = resolve_fn(fn_spec, fn_file or fn_file_hint)
            args = pickle.loads(args_blob)
            if backend is not None and not initialised:
                phase = "init"
                _init_process_group(backend, pg_timeout_s)
                initialised = True
            phase = "fn"
            value = fn(*args)
            del args
            _between_jobs()
        except BaseException as exc:  # noqa: BLE001 - as in a one-shot run
            _write_result(out, _exception_record(exc, phase))
            traceback.print_exc()
            _flush_and_exit(EXIT_FN_FAILED)
        _write_result(out, {"kind": "ok", "value": value})
        del value


def main(argv: list[str]) -> int:
    pool = len(argv) == 3 and argv[2] == POOL_FLAG
    if len(argv) != 2 and not pool:
        print(f"usage: python -m moeconf.distributed._rank_main RUN_DIR [{POOL_FLAG}]", file=sys.stderr)
        return EXIT_BAD_INVOCATION
    run_dir = Path(argv[1])
    rank = int(os.environ["RANK"])
    _install_stack_dump(stack_path(run_dir, rank))
    _die_with_parent()

    with open(payload_path(run_dir), "rb") as fh:
        fn_spec, fn_file, args_blob, backend, pg_timeout_s = pickle.load(fh)
    if pool:
        _serve(run_dir, rank, fn_file, backend, pg_timeout_s)
        # EOF: the parent kills the pool's group right after closing stdin; no teardown collective
        # (a peer may already be gone), no atexit hooks (they may wait for peers)
        _flush_and_exit(EXIT_OK)
    out = result_path(run_dir, rank)

    phase = "import"
    try:
        fn = resolve_fn(fn_spec, fn_file)
        args = pickle.loads(args_blob)  # after the import: args may use its classes
        if backend is not None:
            phase = "init"
            _init_process_group(backend, pg_timeout_s)
        phase = "fn"
        value = fn(*args)
    except BaseException as exc:  # noqa: BLE001 - SystemExit/KeyboardInterrupt in fn count too
        _write_result(out, _exception_record(exc, phase))
        traceback.print_exc()
        _flush_and_exit(EXIT_FN_FAILED)
        return EXIT_FN_FAILED  # unreachable; keeps type checkers happy

    _write_result(out, {"kind": "ok", "value": value})
    _teardown(backend)
    _flush_and_exit(EXIT_OK)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv))
