"""Multi-rank backends: the registry block under DeepSpeed ZeRO-2/3 or torch FSDP2, on N local ranks.

- ``zero3-leaf``: ZeRO-3 with the block class registered via ``deepspeed.utils.set_z3_leaf_modules``.
- ``zero2-dense`` / ``fsdp2-dense``: ZeRO-2 / FSDP2 with the dense patched block.
- Negative controls: ``zero3`` (no leaf), ``zero2`` / ``fsdp2`` (stock block).

Every case runs with the same batch replicated on all ranks (so the averaged gradients equal the
single-process ones and the standard parity checks apply); ``run_session`` also runs the adversarial
multi-step case (``moeconf.harness.steps``). A hang or a dead rank is raised as ``RankFailure``
(one-line summary + every rank's Python stack); no process outlives the call.

Blame: before any rank starts, ``preflight`` finds what the machine lacks (a writable temp dir and
torch-extension dir, a free port, deepspeed) and settles DeepSpeed's build (a killed build's lock
removed, the comm op built once, up front, outside the ranks' deadline); after a failed launch,
``environment_verdict`` recognises ranks that died or waited because of the machine. Both raise
``EnvironmentFault`` (``setup`` records, exit 2); only what remains is a ``RankFailure`` of the code.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from moeconf.backends.base import (
    EnvironmentFault,
    FailureKind,
    Observation,
    RankFailure,
    RunRequest,
    StepsObservation,
    StepsRequest,
    steps_observation,
)
from moeconf.backends.dense import dense_reason
from moeconf.backends.rank_job import RankJob, RankResult, Strategy
from moeconf.devices import SettingError, device_available, device_count, rank_deadline_s
from moeconf.distributed import MultiRankResult, RankOutcome, run_ranks
from moeconf.distributed.deepspeed_env import LOCK_WAIT_S, extensions_fix, extensions_root, prepare_deepspeed_cpu
from moeconf.distributed.environment import EnvironmentProblem, check_free_port, check_temp_dir, environment_cause
from moeconf.distributed.launcher import importing_module, pooled_run
from moeconf.distributed.torchrun import COMM_BACKENDS
from moeconf.registry.entry import ArchEntry

HEADLINE_MAX = 400
"""Characters of a summary line (a long exception message must not turn it into a page)."""


def _notice(message: str) -> None:
    """One line on stderr for what the user should know but that is not a result (a removed lock,
    a first build): stdout is the report's."""
    print(f"moeconf: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# before any rank starts


@functools.cache
def _deepspeed_ready(cache_vars: tuple[str | None, ...], lock_wait_s: float) -> None:
    """Once per process and cache location (``cache_vars``: the variables that move it): a writable
    extension dir, no dead build's lock, DeepSpeed's CPU comm op built. A failure is not cached."""
    prepare_deepspeed_cpu(_notice, lock_wait_s=lock_wait_s)


def _cache_vars() -> tuple[str | None, ...]:
    return tuple(os.environ.get(v) for v in ("TORCH_EXTENSIONS_DIR", "XDG_CACHE_HOME", "HOME"))


def _deepspeed_installed() -> bool:
    """Without importing it (seconds, and DeepSpeed picks its accelerator at import)."""
    return importlib.util.find_spec("deepspeed") is not None


def preflight(backend_name: str, uses_deepspeed: bool, lock_wait_s: float = LOCK_WAIT_S, device: str = "cpu") -> None:
    """Faults of the machine that would make the ranks die or wait for reasons unrelated to the MoE
    code, raised as ``EnvironmentFault`` (one line naming the path or resource and the fix).

    A missing deepspeed for a DeepSpeed backend is one of them: ``supports()`` judges the
    architecture, this judges the machine; the backend was asked for, so not running it is not a
    pass (``setup``, exit 2), whatever else ran.
    """
    try:
        check_temp_dir()
        check_free_port()
        if uses_deepspeed:
            if not _deepspeed_installed():
                raise EnvironmentProblem(
                    f"deepspeed is not installed and {backend_name} needs it: pip install 'moeconf[deepspeed]'"
                )
            if device == "cpu":  # DeepSpeed's CPU comm op; on CUDA/NPU the collectives are NCCL/HCCL
                _deepspeed_ready(_cache_vars(), lock_wait_s)
    except EnvironmentProblem as exc:
        raise EnvironmentFault(str(exc)) from None


# --------------------------------------------------------------------------
# after the ranks: the machine's fault, or the code's


def _machine_dirs() -> dict[Path, str]:
    """Directories whose faults are the machine's, each with the variable that moves it."""
    home = Path(os.path.abspath(os.path.expanduser("~")))
    return {
        Path(os.path.abspath(extensions_root())): extensions_fix(),
        Path(os.path.abspath(tempfile.gettempdir())): "set TMPDIR to a writable directory",
        home: f"make HOME={home} writable, or set TORCH_EXTENSIONS_DIR and TMPDIR to writable directories",
    }


def _in_extension_build(o: RankOutcome) -> bool:
    """Was the rank (at the deadline) waiting on a torch-extension build lock or compiling one?
    That is DeepSpeed's JIT cache, never the MoE code."""
    where = o.where() or ""
    return where.split(" at ", 1)[-1].startswith(("file_baton.py", "cpp_extension.py"))


def environment_verdict(result: MultiRankResult) -> str | None:
    """One line when the ranks failed because of the machine (conservative: known signatures only,
    see ``moeconf.distributed.environment.environment_cause``), else None."""
    if result.status == "error":
        return f"the ranks could not start: {result.message.splitlines()[0] if result.message else 'launcher error'}"
    if result.status == "crash":
        first = sorted(result.outcomes, key=lambda o: o.rank != result.failed_rank)
        for o in first:
            cause = environment_cause(o.exception or "", _machine_dirs())
            if cause:
                return f"rank {o.rank} died of a fault of the machine: {cause}"
    if result.status == "deadlock":
        return _slow_not_stuck(result)
    return None


def _slow_not_stuck(result: MultiRankResult) -> str | None:
    """A deadline that passed while ranks were not running the code under test yet: waiting on a
    torch-extension build lock, compiling one, or every still-running rank importing modules (an
    overloaded machine; a rank that waits for its peers in a collective is never in an import)."""
    running = [o for o in result.outcomes if o.killed_by_launcher]
    building = [o for o in running if _in_extension_build(o)]
    if building:
        where = "; ".join(f"rank {o.rank} in {o.where()}" for o in building)
        return (
            f"ranks {[o.rank for o in building]} were still loading a torch extension after "
            f"{result.deadline_s:g} s ({where}): a build lock under {extensions_root()} is held by another "
            "process or was left by a killed build; rerun (moeconf removes a stale lock first) or rm it"
        )
    imports = {o.rank: importing_module(o.stack or "") for o in running}
    if running and all(imports.values()):
        where = "; ".join(f"rank {r} in {_short_path(m or '?')}" for r, m in imports.items())
        return (
            f"ranks {list(imports)} were still importing modules after {result.deadline_s:g} s ({where}): "
            "the machine is too slow or too loaded for the deadline; raise MOECONF_DEADLINE_S"
        )
    return None


def _short_path(path: str) -> str:
    """``torch/_inductor/codegen/simd.py`` rather than the site-packages path."""
    parts = Path(path).parts
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1 :])
    return "/".join(parts[-3:])


def _clip(line: str) -> str:
    return line if len(line) <= HEADLINE_MAX else line[: HEADLINE_MAX - 3] + "..."


def headline(result: MultiRankResult) -> str:
    """One line: what happened, to which rank, with which signal or exception, and where."""
    if result.status == "deadlock":
        running = [o for o in result.outcomes if o.killed_by_launcher]
        where = "; ".join(f"rank {o.rank} in {o.where()}" if o.where() else f"rank {o.rank}: no stack" for o in running)
        done = [o.rank for o in result.outcomes if not o.killed_by_launcher]
        tail = f"; ranks {done} had finished" if done else ""
        ranks = [o.rank for o in running]
        return _clip(f"hang: ranks {ranks} still running after {result.deadline_s:g} s ({where}){tail}")
    failed = next((o for o in result.outcomes if o.rank == result.failed_rank), None)
    if failed is None:
        return _clip(f"{result.status}: {result.message.splitlines()[0] if result.message else 'no rank result'}")
    where = failed.where()
    at = f" (in {where})" if where else ""
    if failed.exception:
        return _clip(f"crash: rank {failed.rank} raised {failed.exception_line()}{at}")
    without = " without returning a result" if failed.exitcode == 0 else ""
    return _clip(f"crash: rank {failed.rank} {failed.describe_exit()}{without}{at}")


def launch(
    name: str,
    rank_fn: str,
    job: object,
    world_size: int,
    deadline_s: float,
    env: dict[str, str],
    reuse_ranks: bool,
    device: str = "cpu",
) -> list:  # type: ignore[type-arg]
    """Every rank's return value of ``rank_fn(job)``: on the pool of (``name``, ``rank_fn``,
    ``world_size``, ``env``) when ``reuse_ranks``, else on fresh ranks. ``RankFailure`` on a hang or
    a dead rank (the pool is then gone; the next session gets a fresh one), ``EnvironmentFault``
    when the machine is at fault.

    The key holds the backend's name so that two backends never share processes: a negative
    control's rank state (a DeepSpeed config switched off, a patched function) cannot reach the
    real backend's jobs."""
    comm = COMM_BACKENDS[device]  # gloo / nccl / hccl; each rank on its own device (LOCAL_RANK)
    if reuse_ranks:
        key = ("moeconf-backend", name, rank_fn, world_size, comm, tuple(sorted(env.items())))
        result = pooled_run(key, rank_fn, (job,), world_size=world_size, deadline_s=deadline_s, env=env, backend=comm)
    else:
        result = run_ranks(rank_fn, (job,), world_size=world_size, deadline_s=deadline_s, env=env, backend=comm)
    if result.status != "ok":
        cause = environment_verdict(result)
        if cause is not None:
            raise EnvironmentFault(cause)
        kind: FailureKind = "hang" if result.status == "deadlock" else "crash"
        raise RankFailure(kind, headline(result), result.report(), result.run_id)
    return result.results


def launch_deadline(deadline_s: float | None) -> float:
    """A launch's deadline: the backend's own, else ``MOECONF_DEADLINE_S`` (``EnvironmentFault`` naming
    the variable when it is unusable)."""
    if deadline_s is not None:
        return deadline_s
    try:
        return rank_deadline_s()
    except SettingError as exc:
        raise EnvironmentFault(str(exc)) from None


def ranks_reason(name: str, world_size: int, device: str) -> str | None:
    """Why ``world_size`` ranks cannot run on ``device`` here (one rank per CUDA/NPU device), else None."""
    available = device_count(device)
    if available >= world_size:
        return None
    return f"{name} needs {world_size} {device} devices (one per rank), this machine has {available}"


def token_types_reason(entry: ArchEntry) -> str | None:
    """The rank jobs call the block with the hidden states only; a block whose expert set is chosen
    by a per-token type (ERNIE-4.5-VL) needs the type ids too, which they do not pass yet."""
    if entry.spec.token_sets is None:
        return None
    return "the rank job does not pass per-token types to the block (expert sets chosen by token type)"


@dataclass
class PartitionedBackend:
    """A block sharded over ``world_size`` local ranks (gloo on CPU); a ``MultiRankBackend``."""

    name: str
    strategy: Strategy
    leaf: bool = False
    dense: bool = False
    world_size: int = 2
    deadline_s: float | None = None
    """Seconds before the launch counts as hung; None: ``MOECONF_DEADLINE_S`` (default 120), read
    at each launch."""
    devices: tuple[str, ...] = ("cpu", "cuda", "npu")
    """One rank per device on CUDA/NPU (NCCL/HCCL): ``supports()`` refuses when there are fewer."""
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    rank_fn: str = "moeconf.backends.rank_job:run_job"
    negative_control: bool = False
    """A configuration known to be wrong (no leaf, stock block): the suite expects it to be caught."""
    lock_wait_s: float = LOCK_WAIT_S
    """How long to wait for another process's live build of DeepSpeed's op before a ``setup`` fault."""
    router_losses_in_steps: bool = True
    """The adversarial steps weigh the aux and z losses in each rank's loss and accumulate gradients
    over 2 micro-batches (``StepsRequest.aux_coef``/``accumulation``); the rank job supports it."""
    reuse_ranks: bool = True
    """Run each session on this backend's rank pool (``moeconf.distributed.launcher.pooled_run``):
    the ranks stay up for the next architecture instead of importing torch, transformers and
    DeepSpeed again (~20 s a launch). False: fresh ranks per session, as ``run_ranks``."""

    @property
    def steps_world_size(self) -> int:
        """The adversarial steps draw one batch (and one expert subset) per rank."""
        return self.world_size

    @property
    def uses_deepspeed(self) -> bool:
        return self.strategy != "fsdp2"

    def supports(self, entry: ArchEntry, dtype: str, device: str) -> str | None:
        if device not in self.devices or not device_available(device):
            return f"{self.name} runs on {', '.join(self.devices)} only"
        reason = ranks_reason(self.name, self.world_size, device) or token_types_reason(entry)
        if reason is not None:
            return reason
        if self.dense:
            return dense_reason(entry)
        return None

    def run(self, request: RunRequest) -> Observation:
        observations, _ = self.run_session([request], None)
        return observations[0]

    def deadline(self) -> float:
        return launch_deadline(self.deadline_s)

    def job(self, requests: list[RunRequest], steps: StepsRequest | None) -> RankJob:
        """What every rank runs for these requests (here, or in a torchrun job: ``moeconf.partition``)."""
        first = requests[0] if requests else steps
        assert first is not None
        return RankJob(
            entry=first.entry,
            strategy=self.strategy,
            leaf=self.leaf,
            dense=self.dense,
            dtype=first.dtype,
            cases=tuple(requests),
            steps=steps,
            device=first.device,
        )

    def run_session(
        self, requests: list[RunRequest], steps: StepsRequest | None
    ) -> tuple[list[Observation], StepsObservation | None]:
        """All cases (and the adversarial steps) of one architecture in one multi-rank launch."""
        first = requests[0] if requests else steps
        if first is None:
            return [], None
        deadline_s = self.deadline()
        preflight(self.name, self.uses_deepspeed, self.lock_wait_s, first.device)
        job = self.job(requests, steps)
        env = {"DS_ACCELERATOR": first.device, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
        per_rank: list[RankResult] = launch(
            self.name, self.rank_fn, job, self.world_size, deadline_s, env, self.reuse_ranks, first.device
        )
        steps_obs = None if steps is None else steps_observation([r.steps or [] for r in per_rank])
        return per_rank[0].cases, steps_obs


ZERO3_LEAF = PartitionedBackend("zero3-leaf", "zero3", leaf=True)
ZERO3 = PartitionedBackend("zero3", "zero3", negative_control=True)
ZERO2_DENSE = PartitionedBackend("zero2-dense", "zero2", dense=True)
ZERO2 = PartitionedBackend("zero2", "zero2", negative_control=True)
FSDP2_DENSE = PartitionedBackend("fsdp2-dense", "fsdp2", dense=True)
FSDP2 = PartitionedBackend("fsdp2", "fsdp2", negative_control=True)
PARTITIONED = (ZERO3_LEAF, ZERO3, ZERO2_DENSE, ZERO2, FSDP2_DENSE, FSDP2)
