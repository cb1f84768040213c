"""The three suites, each a generic pytest template over registry × backends × dtype × device:

- ``parity/``: every architecture on every single-process backend that runs on the device, against
  the float64 reference (marker ``parity``);
- ``partition/``: the multi-rank backends (DeepSpeed ZeRO-2/3, FSDP2) with the adversarial steps and
  the negative controls (marker ``partition``);
- ``perf/``: the performance suite (marker ``perf``).

The backend lists are computed from the backends' capability flags (``devices``, multi-rank or not,
negative control or not), never typed by hand; ``supports()`` then decides per architecture. nox
sessions select a suite by marker. The environment narrows the matrix (read when a suite is
collected, through ``matrix()``):

- ``MOECONF_DEVICE``: cpu | cuda | npu (default cpu)
- ``MOECONF_BACKENDS``: comma-separated backend names (default: the suite's computed list)
- ``MOECONF_DTYPES``: comma-separated dtypes (default fp32,bf16)
- ``MOECONF_ARCHS``: comma-separated model types (default: the suite's architectures)
- ``MOECONF_CONFIGS``: comma-separated config samples beyond ``tiny`` that the parity suite's
  ``test_config_samples`` runs (kinds or names; default ``default,published,hypothesis,invalid``;
  ``none``: that test skips)
- ``MOECONF_REQUIRE_DEVICE=1``: a missing device is an error instead of a skip
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from moeconf.backends import BUILTIN, resolve_backend
from moeconf.backends.base import is_multi_rank
from moeconf.devices import DEVICES, DTYPES, use_threads_for_tiny_shapes
from moeconf.registry import REGISTRY, UnknownName

use_threads_for_tiny_shapes()

SuiteName = Literal["parity", "partition"]


def suite_backends(suite: SuiteName, device: str, negative_controls: bool = False) -> list[str]:
    """Built-in backends of a suite that can run on ``device``, from their capability flags."""
    names = []
    for name in BUILTIN:
        backend = resolve_backend(name)
        if device not in backend.devices or is_multi_rank(backend) != (suite == "partition"):
            continue
        if bool(getattr(backend, "negative_control", False)) != negative_controls:
            continue
        names.append(name)
    return names


CONFIG_SAMPLES_BEYOND_TINY = ("default", "published", "hypothesis", "invalid")


@dataclass(frozen=True)
class Matrix:
    device: str
    archs: list[str]
    backends: list[str]
    dtypes: list[str]
    configs: tuple[str, ...] = CONFIG_SAMPLES_BEYOND_TINY
    """Config samples beyond ``tiny`` (``MOECONF_CONFIGS``); empty: none."""


def _listed(name: str, default: Sequence[str], valid: Sequence[str]) -> list[str]:
    values = [v.strip() for v in os.environ.get(name, "").split(",") if v.strip()]
    unknown = [v for v in values if v not in valid and ":" not in v]
    if unknown:
        raise UnknownName(f"{name}: unknown value(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return values or list(default)


def matrix(suite: SuiteName, archs: Sequence[str] | None = None, dtypes: Sequence[str] = ("fp32", "bf16")) -> Matrix:
    """The suite's matrix, narrowed by ``MOECONF_*`` (an unknown value is a usage error)."""
    device = os.environ.get("MOECONF_DEVICE", "cpu")
    if device not in DEVICES:
        raise UnknownName(f"MOECONF_DEVICE={device!r}; valid: {', '.join(DEVICES)}")
    return Matrix(
        device=device,
        archs=_listed("MOECONF_ARCHS", archs if archs is not None else sorted(REGISTRY), sorted(REGISTRY)),
        backends=_listed("MOECONF_BACKENDS", suite_backends(suite, device), list(BUILTIN)),
        dtypes=_listed("MOECONF_DTYPES", dtypes, list(DTYPES)),
        configs=_configs(),
    )


def _configs() -> tuple[str, ...]:
    from moeconf.harness.samples import UnknownConfig, check_selectors

    values = tuple(v.strip() for v in os.environ.get("MOECONF_CONFIGS", "").split(",") if v.strip())
    if values == ("none",):
        return ()
    try:
        check_selectors(values)
    except UnknownConfig as exc:
        raise UnknownName(f"MOECONF_CONFIGS: {exc}") from None
    return values or CONFIG_SAMPLES_BEYOND_TINY
