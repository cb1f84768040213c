"""Joining a process group that someone else launched: torchrun, DeepSpeed's launcher, SLURM's srun.

moeconf's own launcher (``run_ranks``) starts the ranks itself and hands them ``RANK``/``WORLD_SIZE``/
``MASTER_*``. On a cluster the ranks are started by the site's tool instead, and each one reads the
standard variables:

- ``torchrun`` / ``python -m torch.distributed.run`` and ``deepspeed --hostfile ...`` set ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (torchrun; DeepSpeed: ``LOCAL_SIZE``) and
  ``MASTER_ADDR``/``MASTER_PORT``;
- ``srun`` sets ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` (``SLURM_NTASKS_PER_NODE``,
  ``SLURM_JOB_NODELIST``, ``SLURM_JOB_ID``) and nothing torch reads: they are mapped here when
  ``RANK`` is absent (a torchrun started *by* srun sets ``RANK`` and wins).

Only the standard library at module level (the package's rule); torch is imported where the group is
initialised.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta

SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 20000
"""Without ``MASTER_PORT`` a SLURM job uses ``SLURM_PORT_BASE + SLURM_JOB_ID % SLURM_PORT_SPAN``: every
task of the job computes the same port without talking to the others, and two jobs on one node
rarely collide (set ``MASTER_PORT`` to choose)."""

COMM_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
"""``torch.distributed`` backend per ``--device``: the collective library of that device."""


class LaunchEnvError(ValueError):
    """The environment does not say which rank this process is (one line naming the variable)."""


@dataclass(frozen=True)
class LaunchEnv:
    """Who this process is in the job, and where the rendezvous is."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str
    """``"torch"`` (RANK/WORLD_SIZE as torchrun and DeepSpeed's launcher set them) or ``"slurm"``."""

    def variables(self) -> dict[str, str]:
        """The standard variables, as ``init_process_group(init_method="env://")`` reads them."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    text = env.get(name)
    if text is None or text.strip() == "":
        if default is None:
            raise LaunchEnvError(f"{name} is not set")
        return default
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise LaunchEnvError(f"{name}={text!r} is not a whole number") from None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (what ``scontrol show hostnames "$SLURM_JOB_NODELIST" |
    head -1`` prints): ``gpu[03-05,09],cpu1`` -> ``gpu03``, ``a1,a2`` -> ``a1``."""
    head = re.match(r"([^,\[]*)(\[([^\]]*)\])?", nodelist.strip())
    if head is None or not head.group(1) and not head.group(3):
        raise LaunchEnvError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    prefix, ranges = head.group(1), head.group(3)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]  # zero padding is part of the name: keep the text
    return prefix + first


def _tasks_per_node(env: Mapping[str, str]) -> int:
    """``SLURM_NTASKS_PER_NODE`` may read ``4`` or ``4(x2)`` or ``4,2(x3)``: the first count (the
    local group of this node is what FSDP meshes use; moeconf only reports it)."""
    text = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    m = re.match(r"\s*(\d+)", text)
    return int(m.group(1)) if m else 1


def read_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """This process's place in the job from ``env`` (default ``os.environ``): the torch variables when
    ``RANK`` is set, else SLURM's; ``LaunchEnvError`` when neither says it."""
    env = os.environ if env is None else env
    if env.get("RANK") is not None:
        rank = _int(env, "RANK")
        world = _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK", default=0)
        # NOTE: DeepSpeed's launcher says LOCAL_SIZE where torchrun says LOCAL_WORLD_SIZE
        local_world = _int(env, "LOCAL_WORLD_SIZE" if env.get("LOCAL_WORLD_SIZE") else "LOCAL_SIZE", default=1)
        addr = env.get("MASTER_ADDR") or "127.0.0.1"
        port = _int(env, "MASTER_PORT", default=29500)
        source = "torch"
    elif env.get("SLURM_PROCID") is not None:
        rank = _int(env, "SLURM_PROCID")
        world = _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID", default=0)
        local_world = _tasks_per_node(env)
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "")
        if env.get("MASTER_PORT"):
            port = _int(env, "MASTER_PORT")
        else:
            port = SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID") % SLURM_PORT_SPAN
        source = "slurm"
    else:
        raise LaunchEnvError(
            "neither RANK (torchrun, deepspeed) nor SLURM_PROCID (srun) is set: start this under a launcher, "
            "or use `moeconf check`, which starts its own ranks"
        )
    if world < 1 or not 0 <= rank < world:
        raise LaunchEnvError(f"rank {rank} is outside a world of {world} ({source} variables)")
    if local < 0:
        raise LaunchEnvError(f"local rank {local} is negative ({source} variables)")
    return LaunchEnv(rank, world, local, local_world, addr, port, source)


def export(launch: LaunchEnv, env: MutableMapping[str, str] | None = None) -> None:
    """Write the standard variables into ``env`` (default ``os.environ``) where they are missing, so
    that torch's ``env://`` and DeepSpeed (which reads ``LOCAL_RANK``) find them under srun too."""
    env = os.environ if env is None else env
    for name, value in launch.variables().items():
        env.setdefault(name, value)


def comm_backend(device: str) -> str:
    """``gloo`` / ``nccl`` / ``hccl`` for ``cpu`` / ``cuda`` / ``npu``."""
    try:
        return COMM_BACKENDS[device]
    except KeyError:
        raise LaunchEnvError(f"no collective backend for device {device!r}") from None


def init_from_env(device: str, timeout_s: float) -> LaunchEnv:
    """Join the job's process group (``env://``) with a per-collective ``timeout_s``.

    NOTE: the timeout is what turns a hang under an outside launcher into an exception: torchrun's
    agent only notices a rank that *exits*; ranks blocked in a collective wait forever without it.
    """
    import torch
    import torch.distributed as dist

    launch = read_launch_env()
    export(launch)  # torch's env:// reads os.environ
    backend = comm_backend(device)
    if device == "cuda":
        torch.cuda.set_device(launch.local_rank)
    elif device == "npu":
        import torch_npu  # type: ignore[import-not-found]  # noqa: F401  (registers torch.npu and hccl)

        torch.npu.set_device(launch.local_rank)  # type: ignore[attr-defined]
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return launch
