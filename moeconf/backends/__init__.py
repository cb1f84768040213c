"""Backends: thin adapters that run the code under test behind one Protocol (``Backend``).

Resolution of a ``--backend`` value: a built-in name, an entry point in the ``moeconf.backends``
group, or ``package.module:attr`` (a backend object, a class, or a zero-argument factory).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points

from moeconf.backends.base import (
    Backend,
    BackendError,
    EnvironmentFault,
    MultiRankBackend,
    Observation,
    RankFailure,
    RunRequest,
    StepsObservation,
    StepsRequest,
    is_multi_rank,
)
from moeconf.backends.hf import HFBlockBackend
from moeconf.registry import UnknownName


def _builtin(module: str, attr: str) -> Callable[[], Backend]:
    """A factory that imports the backend's module on first use.

    NOTE: lazy, because each backend pulls its own stack (the NPU emulator, the multi-rank launcher)
    and rank processes or a run of one backend should load only what they use.
    """
    return lambda: getattr(importlib.import_module(f"moeconf.backends.{module}"), attr)


def _partitioned(name: str) -> Callable[[], Backend]:
    def load() -> Backend:
        from moeconf.backends.partitioned import PARTITIONED

        return next(b for b in PARTITIONED if b.name == name)

    return load


BUILTIN: dict[str, Callable[[], Backend]] = {
    "hf-eager": _builtin("hf", "HF_EAGER"),
    "hf-grouped-mm": _builtin("hf", "HF_GROUPED_MM"),
    "hf-batched-mm": _builtin("hf", "HF_BATCHED_MM"),
    "hf-dense": _builtin("hf", "HF_DENSE"),
    "grouped-mm": _builtin("grouped_mm", "GROUPED_MM"),
    "npu-gmm": _builtin("npu_gmm", "NPU_GMM"),
    **{name: _partitioned(name) for name in ("zero3-leaf", "zero3", "zero2-dense", "zero2", "fsdp2-dense", "fsdp2")},
}
ENTRY_POINT_GROUP = "moeconf.backends"


def _instantiate(obj: object, origin: str) -> Backend:
    backend = obj() if isinstance(obj, type) or (callable(obj) and not isinstance(obj, Backend)) else obj
    if not isinstance(backend, Backend):
        raise UnknownName(f"{origin} is not a moeconf backend (needs name, devices, dtypes, supports(), run())")
    return backend


def available_backends() -> list[str]:
    """Built-in names plus installed entry points."""
    return sorted(set(BUILTIN) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def resolve_backend(name: str) -> Backend:
    """The backend called ``name`` (see module docstring), or ``UnknownName`` listing valid names."""
    if name in BUILTIN:
        return BUILTIN[name]()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return _instantiate(ep.load(), f"entry point {name!r}")
    if ":" in name:
        module_name, _, attr = name.partition(":")
        if os.getcwd() not in sys.path:  # as `python -m` would: a repro from the project root finds its modules
            sys.path.append(os.getcwd())
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UnknownName(f"cannot load backend {name!r}: {exc}") from None
        return _instantiate(obj, name)
    raise UnknownName(
        f"unknown backend {name!r}; available: {', '.join(available_backends())} (or package.module:attr)"
    )


__all__ = [
    "BUILTIN",
    "Backend",
    "BackendError",
    "EnvironmentFault",
    "HFBlockBackend",
    "MultiRankBackend",
    "Observation",
    "RankFailure",
    "RunRequest",
    "StepsObservation",
    "StepsRequest",
    "available_backends",
    "is_multi_rank",
    "resolve_backend",
]
