"""pytest plugin: a downstream repository runs moeconf's checks on its own backend and architectures
from its own test suite (entry point ``pytest11``: loaded wherever moeconf is installed).

The whole downstream test file::

    from moeconf.pytest_plugin import parity_tests

    test_moe_parity = parity_tests(
        backend="myframework.moe:GROUPED",            # or a built-in name, or several
        registry="myframework.moe:ARCHITECTURES",     # optional: architectures moeconf does not ship
        archs=["myframework_moe", "mixtral", "qwen3_moe"],
    )

One test per (architecture, backend, dtype), exactly like moeconf's parity suite: every case and
check of ``moeconf check``, marked ``parity`` (``partition`` for a multi-rank backend, which also runs
its adversarial steps) and with the device (``cpu``/``cuda``/``npu``). A failure lists each failing
record with moeconf's message and the ``moeconf check ...`` line that reruns exactly that record.

The command line narrows or replaces what the file asks for, so CI can pick a slice without
editing it: ``--moeconf-backend``, ``--moeconf-arch``, ``--moeconf-dtype`` replace,
``--moeconf-registry`` adds, ``--moeconf-device`` sets the device (default: ``$MOECONF_DEVICE``,
else cpu). A test that takes the ``moeconf_case`` argument without ``parity_tests`` is parametrised
from those options alone (``def test_moe(moeconf_case): moeconf_case.check()``).

NOTE: this module is imported by every pytest run in an environment that has moeconf, including
runs that never use it: it imports only pytest and the standard library at the top; torch,
transformers and the engine are imported when a test asks for ``moeconf_case``.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from moeconf.harness.engine import CheckResult, Selection

MATRIX_ATTR = "__moeconf_matrix__"
CASE_ARG = "moeconf_case"
MARKERS = {
    "parity": "moeconf: backend vs the float64 reference (single process)",
    "partition": "moeconf: multi-rank backend (ZeRO/FSDP2) vs the reference, with adversarial steps",
    "perf": "moeconf: performance",
    "cpu": "runs on CPU",
    "cuda": "needs a CUDA device",
    "npu": "needs an Ascend NPU",
}
DEFAULT_BACKENDS = ("hf-eager",)
DEFAULT_DTYPES = ("fp32",)


@dataclass(frozen=True)
class Matrix:
    """What a ``parity_tests`` function asks for; empty tuples mean "the default"."""

    backends: tuple[str, ...] = ()
    archs: tuple[str, ...] = ()
    registries: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ()
    device: str | None = None
    cases: tuple[str, ...] = ()
    checks: tuple[str, ...] = ()
    seed: int = 0
    configs: tuple[str, ...] = ()


@dataclass(frozen=True)
class MoeconfCase:
    """One test: an architecture on a backend in one dtype on one device."""

    arch: str
    backend: str
    dtype: str
    device: str
    multi_rank: bool
    cases: tuple[str, ...] = ()
    checks: tuple[str, ...] = ()
    seed: int = 0
    configs: tuple[str, ...] = ()
    """Config samples (``moeconf check --config``); empty: the CLI's default (tiny and published)."""
    program: str = "moeconf"
    """Prefix of the repro lines: ``moeconf``, plus ``--registry`` for an architecture that only a
    ``package.module:attr`` registry knows (an entry point needs nothing: it is installed)."""

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.backend}-{self.dtype}"

    @property
    def suite(self) -> str:
        return "partition" if self.multi_rank else "parity"

    def selection(self) -> Selection:
        import dataclasses

        from moeconf.harness.engine import Selection

        sel = Selection(
            archs=(self.arch,),
            backends=(self.backend,),
            dtypes=(self.dtype,),
            device=self.device,
            seed=self.seed,
            program=self.program,
        )
        # Empty: every case and check that applies (the Selection's defaults, as `moeconf check`).
        from moeconf.harness.engine import DEFAULT_CONFIGS

        return dataclasses.replace(
            sel,
            cases=self.cases or sel.cases,
            checks=self.checks or sel.checks,
            configs=self.configs or DEFAULT_CONFIGS,
        )

    def repro(self) -> str:
        """The ``moeconf check`` line that reruns this whole test (each failing record has its own)."""
        args = [*shlex.split(self.program), "check", "--arch", self.arch, "--backend", self.backend]
        args += ["--dtype", self.dtype, "--device", self.device, "--seed", str(self.seed)]
        args += [*(["--case", *self.cases] if self.cases else []), *(["--check", *self.checks] if self.checks else [])]
        args += ["--config", *self.configs] if self.configs else []
        return shlex.join(args)

    def check(self) -> list[CheckResult]:
        """Run every record; the test fails with each failing record's message and repro line,
        skips (with the reason) when nothing applies, and skips or fails without the device as the
        suites do (``MOECONF_REQUIRE_DEVICE=1``)."""
        from moeconf.suites.run import require_device, run_and_judge

        require_device(self.device)
        return run_and_judge(self.selection())


def _tuple(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def parity_tests(
    backend: str | Sequence[str] | None = None,
    archs: str | Sequence[str] | None = None,
    registry: str | Sequence[str] | None = None,
    dtypes: str | Sequence[str] | None = None,
    device: str | None = None,
    cases: Sequence[str] | None = None,
    checks: Sequence[str] | None = None,
    seed: int = 0,
    configs: Sequence[str] | None = None,
) -> Callable[[MoeconfCase], None]:
    """A test function to bind to a ``test_*`` name; the plugin parametrises it at collection.

    Args:
        backend: backend names, ``moeconf.backends`` entry points or ``package.module:attr``
            (default ``hf-eager``).
        archs: model types (default: the entries of ``registry`` when given, else every registered one).
        registry: ``package.module:attr`` holding outside ``ArchEntry`` objects (an entry, or an
            iterable of them); installed ``moeconf.architectures`` entry points are always loaded.
        dtypes: ``fp32``/``bf16`` (default fp32); device: cpu/cuda/npu (default ``$MOECONF_DEVICE``,
            else cpu); cases, checks, seed: as ``moeconf check`` (default: all cases and checks, seed 0).
        configs: config samples, kinds or names (``"hypothesis"``, ``"published:qwen3-30b-a3b"``; default:
            ``moeconf check``'s, tiny and published).
    """
    matrix = Matrix(
        backends=_tuple(backend),
        archs=_tuple(archs),
        registries=_tuple(registry),
        dtypes=_tuple(dtypes),
        device=device,
        cases=_tuple(cases),
        checks=_tuple(checks),
        seed=seed,
        configs=_tuple(configs),
    )

    def test(moeconf_case: MoeconfCase) -> None:
        moeconf_case.check()

    setattr(test, MATRIX_ATTR, matrix)
    return test


# --- pytest hooks -------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("moeconf", "moeconf conformance tests (parity_tests, moeconf_case)")
    group.addoption(
        "--moeconf-backend",
        action="append",
        default=[],
        metavar="B",
        help="backend(s) to check instead of the test file's: names, entry points or package.module:attr "
        "(repeatable, or comma-separated)",
    )
    group.addoption(
        "--moeconf-arch",
        action="append",
        default=[],
        metavar="A",
        help="model type(s) to check instead of the test file's (repeatable, or comma-separated)",
    )
    group.addoption(
        "--moeconf-registry",
        action="append",
        default=[],
        metavar="MODULE:ATTR",
        help="outside architectures to register: an ArchEntry or an iterable of them (repeatable)",
    )
    group.addoption(
        "--moeconf-dtype",
        action="append",
        default=[],
        metavar="D",
        help="dtype(s) instead of the test file's: fp32, bf16 (repeatable, or comma-separated)",
    )
    group.addoption(
        "--moeconf-device", default=None, metavar="D", help="cpu, cuda or npu (default: $MOECONF_DEVICE, else cpu)"
    )


_REGISTERED_BEFORE = pytest.StashKey[object]()
OUTSIDE_MODULE = "moeconf.registry.outside"


def pytest_configure(config: pytest.Config) -> None:
    # NOTE: what a session registers is forgotten when it ends (``pytest_unconfigure``): pytest runs
    # in-process (``pytester``, ``pytest.main`` from a script) must not leave architectures behind for
    # the code that runs after them. Without moeconf imported yet there is nothing to save (and
    # importing it here would load torch into every pytest run).
    outside = sys.modules.get(OUTSIDE_MODULE)
    config.stash[_REGISTERED_BEFORE] = outside.save_state() if outside is not None else None
    known = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    for name, description in MARKERS.items():
        if name not in known:  # the project may declare its own (moeconf does, in pyproject.toml)
            config.addinivalue_line("markers", f"{name}: {description}")
    # NOTE: options are checked before collection, so a typo is one usage line, not an error per test
    # file. Architecture names wait for collection: a test file may register them (``registry=``).
    if any(_option(config, name) for name in ("moeconf_registry", "moeconf_backend", "moeconf_dtype")) or (
        config.getoption("moeconf_device") is not None
    ):
        try:
            _load(_option(config, "moeconf_registry"))
            _check_names((), _option(config, "moeconf_backend"), _option(config, "moeconf_dtype"), _device(config))
        except ValueError as exc:
            raise pytest.UsageError(f"moeconf: {exc}") from None


def pytest_unconfigure(config: pytest.Config) -> None:
    outside = sys.modules.get(OUTSIDE_MODULE)
    if outside is not None:
        saved = config.stash.get(_REGISTERED_BEFORE, None)
        outside.restore_state(saved if saved is not None else outside.EMPTY_STATE)


def _option(config: pytest.Config, name: str) -> tuple[str, ...]:
    values: list[str] = config.getoption(name) or []
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


def _device(config: pytest.Config, matrix: Matrix | None = None) -> str:
    chosen: str | None = config.getoption("moeconf_device") or (matrix.device if matrix else None)
    return chosen or os.environ.get("MOECONF_DEVICE", "cpu")


def _load(registries: Sequence[str]) -> tuple[str, ...]:
    """Register the installed entry points and ``registries``; the model types the latter hold
    (``UnknownName`` when one cannot be used)."""
    from moeconf.registry.outside import load_entry_points, load_registry

    load_entry_points()
    return tuple(dict.fromkeys(e.model_type for spec in registries for e in load_registry(spec)))


def _check_names(archs: Sequence[str], backends: Sequence[str], dtypes: Sequence[str], device: str) -> dict[str, bool]:
    """Every name is known (else ``UnknownName``, one line); the backends, each multi-rank or not."""
    from moeconf.backends import resolve_backend
    from moeconf.backends.base import is_multi_rank
    from moeconf.devices import DEVICES, DTYPES
    from moeconf.registry import UnknownName, get_entry

    if device not in DEVICES:
        raise UnknownName(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
    wrong = [d for d in dtypes if d not in DTYPES]
    if wrong:
        raise UnknownName(f"unknown dtype {wrong[0]!r}; valid: {', '.join(DTYPES)}")
    for arch in archs:
        get_entry(arch)
    return {name: is_multi_rank(resolve_backend(name)) for name in dict.fromkeys(backends)}


def cases_for(config: pytest.Config, matrix: Matrix) -> list[MoeconfCase]:
    """The tests ``matrix`` asks for under the command line's ``--moeconf-*`` options; every name is
    checked first (``UnknownName``: one line naming the valid ones)."""
    from moeconf.registry import all_entries
    from moeconf.registry.outside import registry_spec

    registries = tuple(dict.fromkeys([*matrix.registries, *_option(config, "moeconf_registry")]))
    from_registries = _load(registries)
    archs = _option(config, "moeconf_arch") or matrix.archs or from_registries or tuple(all_entries())
    backends = _option(config, "moeconf_backend") or matrix.backends or DEFAULT_BACKENDS
    dtypes = _option(config, "moeconf_dtype") or matrix.dtypes or DEFAULT_DTYPES
    device = _device(config, matrix)
    multi_rank = _check_names(archs, backends, dtypes, device)
    out = []
    for arch in dict.fromkeys(archs):
        spec = registry_spec(arch)
        program = "moeconf" + (f" --registry {shlex.quote(spec)}" if spec else "")
        for backend, parallel in multi_rank.items():
            for dtype in dict.fromkeys(dtypes):
                out.append(
                    MoeconfCase(
                        arch,
                        backend,
                        dtype,
                        device,
                        parallel,
                        matrix.cases,
                        matrix.checks,
                        matrix.seed,
                        matrix.configs,
                        program,
                    )
                )
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if CASE_ARG not in metafunc.fixturenames:
        return
    matrix = getattr(metafunc.function, MATRIX_ATTR, Matrix())
    try:
        cases = cases_for(metafunc.config, matrix)
    except ValueError as exc:  # UnknownName and its kin: the file's arguments, one line, no traceback
        pytest.fail(f"moeconf: {exc}", pytrace=False)
    params = [
        pytest.param(case, id=case.id, marks=[getattr(pytest.mark, case.suite), getattr(pytest.mark, case.device)])
        for case in cases
    ]
    metafunc.parametrize(CASE_ARG, params)


__all__ = ["Matrix", "MoeconfCase", "cases_for", "parity_tests"]
