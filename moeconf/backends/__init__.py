"""Backends: thin adapters that run the code under test behind one Protocol (``Backend``).

Resolution of a ``--backend`` value: a built-in name, an entry point in the ``moeconf.backends``
group, or ``package.module:attr`` (``attr`` may be dotted: ``module:Class.factory``). What the
entry point or attribute names must be one of:

1. a backend object (has ``name``, ``devices``, ``dtypes``, ``supports()``, ``run()``): used as is;
2. a class defining ``run`` and ``supports``: instantiated with no arguments;
3. a Python function or method, or a ``functools.partial`` of one, whose return annotation is
   ``Backend``/``MultiRankBackend`` or a class defining ``run`` and ``supports``: called with no
   arguments (a ``partial`` of such a class counts too).

Nothing else is ever called. The rule is deliberately about what the object *declares*, not what
it returns: ``--backend os:getpid`` or ``--backend shutil:rmtree`` must not run arbitrary code just
to find out that the result is not a backend. Whatever a class or factory returns is checked to be
a backend object. Every way this can go wrong (no such module, the module raising or not parsing on
import, a class that needs arguments, a factory that raises) is a ``BackendLoadError``: one line, a
usage error, never a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
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
from moeconf.registry.outside import RegistryLoadError, load_attribute, one_line


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


def _expert_parallel(name: str) -> Callable[[], Backend]:
    def load() -> Backend:
        from moeconf.backends.ep_alltoall import EP_BACKENDS

        return next(b for b in EP_BACKENDS if b.name == name)

    return load


BUILTIN: dict[str, Callable[[], Backend]] = {
    "hf-eager": _builtin("hf", "HF_EAGER"),
    "hf-grouped-mm": _builtin("hf", "HF_GROUPED_MM"),
    "hf-batched-mm": _builtin("hf", "HF_BATCHED_MM"),
    "hf-dense": _builtin("hf", "HF_DENSE"),
    "grouped-mm": _builtin("grouped_mm", "GROUPED_MM"),
    "npu-gmm": _builtin("npu_gmm", "NPU_GMM"),
    **{name: _partitioned(name) for name in ("zero3-leaf", "zero3", "zero2-dense", "zero2", "fsdp2-dense", "fsdp2")},
    **{
        name: _expert_parallel(name)
        for name in ("ep-alltoall", "ep-alltoall-4", "ep-alltoall-wrong-splits", "ep-alltoall-no-count-exchange")
    },
}
ENTRY_POINT_GROUP = "moeconf.backends"


class BackendLoadError(UnknownName):
    """A ``--backend`` value that names no usable backend (a usage error; the message is one line)."""


def _defines_backend_methods(cls: type) -> bool:
    return callable(getattr(cls, "run", None)) and callable(getattr(cls, "supports", None))


def _returns_backend(fn: Callable[..., object]) -> bool:
    """Whether ``fn``'s return annotation declares a backend (see the module docstring, rule 3)."""
    try:
        annotation = inspect.signature(fn, eval_str=True).return_annotation
    except (NameError, SyntaxError, TypeError, ValueError):
        # NOTE: an annotation imported under TYPE_CHECKING cannot be evaluated; trust its spelling.
        raw = getattr(fn, "__annotations__", {}).get("return")
        return isinstance(raw, str) and raw.rsplit(".", 1)[-1] in ("Backend", "MultiRankBackend")
    if annotation in (Backend, MultiRankBackend):
        return True
    return isinstance(annotation, type) and _defines_backend_methods(annotation)


def _refusal(obj: object) -> str | None:
    """None when ``obj`` may be called with no arguments to build a backend, else why not."""
    if isinstance(obj, functools.partial):
        inner = _refusal(obj.func)
        return None if inner is None else f"functools.partial over something not allowed: {inner}"
    if isinstance(obj, type):
        if not _defines_backend_methods(obj):
            return f"class {obj.__qualname__} defines no run() and supports()"
        return None
    if inspect.isfunction(obj) or inspect.ismethod(obj):
        if _returns_backend(obj):
            return None
        return (
            f"function {obj.__qualname__} is not annotated to return a backend "
            "(annotate it `-> moeconf.backends.Backend`, or export a backend object)"
        )
    return f"it is a {type(obj).__name__}, not a backend object, a backend class or a backend factory"


def _needs_arguments(obj: Callable[..., object]) -> str | None:
    """The parameters ``obj()`` would be missing, or None when it can be called with no arguments."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None  # no introspectable signature: the call itself will tell
    try:
        signature.bind()
    except TypeError:
        required = [
            p.name
            for p in signature.parameters.values()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        return ", ".join(required)
    return None


def _instantiate(obj: object, origin: str) -> Backend:
    """``obj`` itself when it is a backend object, else what calling it (when allowed) returns."""
    if not isinstance(obj, type) and isinstance(obj, Backend):
        return obj
    refusal = _refusal(obj)
    if refusal is not None:
        raise BackendLoadError(f"{origin} is not a moeconf backend: {refusal}")
    factory: Callable[[], object] = obj  # type: ignore[assignment]
    label = getattr(obj, "__qualname__", None) or getattr(getattr(obj, "func", None), "__qualname__", repr(obj))
    missing = _needs_arguments(factory)
    if missing:
        raise BackendLoadError(
            f"{origin}: {label}() needs arguments ({missing}); export a backend object or a zero-argument factory"
        )
    try:
        made = factory()
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's factory failing is a usage error
        raise BackendLoadError(f"{origin}: {label}() raised {one_line(exc)}") from None
    if isinstance(made, type) or not isinstance(made, Backend):
        raise BackendLoadError(
            f"{origin}: {label}() returned a {type(made).__name__}, not a moeconf backend "
            "(needs name, devices, dtypes, supports(), run())"
        )
    return made


def _load_attribute(name: str) -> object:
    """The object ``package.module:attr[.attr...]`` names; ``BackendLoadError`` on any failure
    (the registry's loader: one set of rules for ``--backend`` and ``--registry``)."""
    try:
        return load_attribute(name, "backend")
    except RegistryLoadError as exc:
        raise BackendLoadError(str(exc)) from None


def available_backends() -> list[str]:
    """Built-in names plus installed entry points."""
    return sorted(set(BUILTIN) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def resolve_backend(name: str) -> Backend:
    """The backend called ``name`` (see module docstring), or ``UnknownName`` listing valid names."""
    if name in BUILTIN:
        return BUILTIN[name]()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                loaded = ep.load()
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - a broken plugin is a usage error
                raise BackendLoadError(f"cannot load entry point {name!r} ({ep.value}): {one_line(exc)}") from None
            return _instantiate(loaded, f"entry point {name!r}")
    if ":" in name:
        return _instantiate(_load_attribute(name), name)
    raise UnknownName(
        f"unknown backend {name!r}; available: {', '.join(available_backends())} (or package.module:attr)"
    )


def with_world_size(backend: Backend, world_size: int | None) -> Backend:
    """``backend`` on ``world_size`` ranks (``--world-size``): a copy of a multi-rank backend whose
    ``world_size`` is a dataclass field; single-process backends are returned as they are.
    ``UnknownName`` (a usage error) for a multi-rank backend that cannot be resized."""
    if world_size is None or not is_multi_rank(backend):
        return backend
    if not dataclasses.is_dataclass(backend) or "world_size" not in {f.name for f in dataclasses.fields(backend)}:
        raise UnknownName(f"backend {getattr(backend, 'name', backend)!r} does not take --world-size")
    return dataclasses.replace(backend, world_size=world_size)  # type: ignore[type-var]


__all__ = [
    "BUILTIN",
    "Backend",
    "BackendError",
    "BackendLoadError",
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
    "with_world_size",
]
