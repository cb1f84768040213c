"""Architectures registered from outside moeconf: a framework's own blocks, remote-code models.

Two ways in, both resolving to an ``ArchEntry`` or an iterable of them (a mapping counts by its
values):

- the entry point group ``moeconf.architectures`` of an installed distribution, loaded once, the
  first time someone asks (``load_entry_points``; the CLI and the pytest plugin ask up front, so a
  broken plugin is a usage error before any work, not a surprise in the middle of a run);
- ``package.module:attr[.attr...]`` (``moeconf check --registry``, ``--moeconf-registry``), loaded
  by ``load_registry``.

Nothing is ever called to obtain the entries: the attribute *is* the data. A model type that is
already built in is refused (the outside entry would silently replace, or be replaced by, the one
the gate vouches for), as is one registered twice with different entries; registering the very
same entry again is a no-op (a ``--registry`` naming what an entry point already registered, or an
xdist worker collecting the same test file twice). Every failure is a ``RegistryLoadError``: one
line, a usage error.

``moeconf.registry.get_entry`` looks here after the built-in registry, so the engine, the config
audit, the bench and the rank processes (which get the pickled entry) need nothing else.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import traceback
from collections.abc import Iterable, Iterator, Mapping
from importlib.metadata import entry_points

# NOTE: the package never imports this module at its top (only inside functions), so by the time
# this runs the package has defined what is imported here.
from moeconf.registry import REGISTRY, UnknownName
from moeconf.registry.entry import ArchEntry

ENTRY_POINT_GROUP = "moeconf.architectures"

_OUTSIDE: dict[str, ArchEntry] = {}
_ORIGIN: dict[str, str] = {}
"""model type → where it came from: ``package.module:attr`` or ``entry point NAME``."""
_ENTRY_POINTS_LOADED = False


class RegistryLoadError(UnknownName):
    """An outside registry that cannot be used (a usage error like an unknown name: every front that
    refuses ``UnknownName`` in one line refuses this too)."""


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message at file:line`` (innermost frame outside importlib)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}{where}" if lines else f"{type(exc).__name__}{where}"


def load_attribute(name: str, what: str) -> object:
    """The object ``package.module:attr[.attr...]`` names; ``RegistryLoadError`` on any failure.

    The same rules as ``--backend package.module:attr`` (``moeconf.backends``): the current directory
    is importable, as under ``python -m``, so a repro line run from a project's root finds its
    modules; a module that is missing, raises, exits or does not parse is one line naming where.
    ``what`` names the thing in the messages ("registry").
    """
    module_name, _, attr_path = name.partition(":")
    if not module_name or not attr_path:
        raise RegistryLoadError(f"cannot load {what} {name!r}: expected package.module:attr")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj: object = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise RegistryLoadError(f"cannot load {what} {name!r}: {exc}") from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a module that raises, exits or does not parse
        raise RegistryLoadError(
            f"cannot load {what} {name!r}: importing {module_name} raised {one_line(exc)}"
        ) from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RegistryLoadError(
                f"cannot load {what} {name!r}: {type(obj).__name__} {getattr(obj, '__name__', '')!s} "
                f"has no attribute {part!r}"
            ) from None
    return obj


def entries_of(obj: object, origin: str) -> tuple[ArchEntry, ...]:
    """``obj`` as a non-empty tuple of entries: an ``ArchEntry``, or an iterable (a mapping: its
    values) of them; anything else is a ``RegistryLoadError`` naming what was found."""
    if isinstance(obj, ArchEntry):
        return (obj,)
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (str, bytes)) or not isinstance(obj, Iterable):
        raise RegistryLoadError(
            f"{origin} is not a moeconf registry: it is a {type(obj).__name__}, "
            "expected an ArchEntry or an iterable of them"
        )
    entries = tuple(obj)
    wrong = [(i, type(e).__name__) for i, e in enumerate(entries) if not isinstance(e, ArchEntry)]
    if wrong:
        i, kind = wrong[0]
        raise RegistryLoadError(f"{origin}: item {i} is a {kind}, not a moeconf.registry.ArchEntry")
    if not entries:
        raise RegistryLoadError(f"{origin} registers no architecture (it is empty)")
    return entries


def register(entries: Iterable[ArchEntry], origin: str) -> tuple[ArchEntry, ...]:
    """Add ``entries`` (all or none) under ``origin``; refuses built-in names and conflicting repeats."""
    entries = tuple(entries)
    seen: dict[str, ArchEntry] = {}
    for entry in entries:
        model_type = entry.model_type
        if model_type in REGISTRY:
            raise RegistryLoadError(
                f"{origin}: model type {model_type!r} is a built-in moeconf architecture; "
                f"register the outside entry under its own model_type (e.g. 'myframework_{model_type}')"
            )
        other = seen.get(model_type, _OUTSIDE.get(model_type))
        if other is not None and other is not entry:
            first = "itself" if model_type in seen else _ORIGIN[model_type]
            raise RegistryLoadError(f"{origin}: model type {model_type!r} is already registered by {first}")
        seen[model_type] = entry
    for model_type, entry in seen.items():
        if model_type not in _OUTSIDE:
            _OUTSIDE[model_type], _ORIGIN[model_type] = entry, origin
    return entries


def load_registry(name: str) -> tuple[ArchEntry, ...]:
    """Register the entries ``package.module:attr`` names (``--registry``); returns them."""
    return register(entries_of(load_attribute(name, "registry"), name), name)


def load_entry_points() -> tuple[ArchEntry, ...]:
    """Register every installed ``moeconf.architectures`` entry point (once); returns what they hold."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return tuple(e for t, e in _OUTSIDE.items() if _ORIGIN[t].startswith("entry point "))
    loaded: list[ArchEntry] = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        dist = getattr(getattr(ep, "dist", None), "name", None)
        origin = f"entry point {ep.name!r}" + (f" of {dist}" if dist else "")
        try:
            obj = ep.load()
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a broken plugin is a usage error
            raise RegistryLoadError(f"cannot load {origin} ({ep.value}): {one_line(exc)}") from None
        loaded.extend(register(entries_of(obj, origin), f"entry point {ep.name}"))
    _ENTRY_POINTS_LOADED = True
    return tuple(loaded)


def outside_entries() -> dict[str, ArchEntry]:
    """Every outside entry registered so far, by model type (a copy)."""
    return dict(_OUTSIDE)


def origin(model_type: str) -> str | None:
    """Where an outside entry came from (``package.module:attr`` or ``entry point NAME``); None for
    a built-in or unknown type."""
    return _ORIGIN.get(model_type)


def registry_spec(model_type: str) -> str | None:
    """The ``--registry`` value a repro line needs for ``model_type`` (None: nothing needed, it is
    built in or arrives through an installed entry point)."""
    where = _ORIGIN.get(model_type)
    return None if where is None or where.startswith("entry point ") else where


State = tuple[dict[str, ArchEntry], dict[str, str], bool]
EMPTY_STATE: State = ({}, {}, False)


def save_state() -> State:
    """What is registered now (``restore_state`` brings it back)."""
    return dict(_OUTSIDE), dict(_ORIGIN), _ENTRY_POINTS_LOADED


def restore_state(state: State) -> None:
    global _ENTRY_POINTS_LOADED
    _OUTSIDE.clear()
    _OUTSIDE.update(state[0])
    _ORIGIN.clear()
    _ORIGIN.update(state[1])
    _ENTRY_POINTS_LOADED = state[2]


@contextlib.contextmanager
def scoped() -> Iterator[None]:
    """Whatever is registered inside is forgotten on the way out.

    NOTE: the CLI's ``main()`` is also called in-process (tests, a framework's own scripts): one
    call's ``--registry`` must not leak into the next call's default selection.
    """
    saved = save_state()
    try:
        yield
    finally:
        restore_state(saved)


__all__ = [
    "ENTRY_POINT_GROUP",
    "RegistryLoadError",
    "entries_of",
    "load_attribute",
    "load_entry_points",
    "load_registry",
    "origin",
    "outside_entries",
    "register",
    "registry_spec",
    "restore_state",
    "save_state",
    "scoped",
]
