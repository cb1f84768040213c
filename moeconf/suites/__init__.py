"""pytest suites shipped with moeconf: ``pytest --pyargs moeconf.suites`` (see noxfile.py).

They are generic: each test is parametrized over registry × backend × dtype × device, chosen by
environment variables so that nox sessions (and hardware runners) pick the matrix:

- ``MOECONF_DEVICE``: cpu | cuda | npu (default cpu)
- ``MOECONF_BACKENDS``: comma-separated backend names (default: every built-in parity backend)
- ``MOECONF_DTYPES``: comma-separated dtypes (default fp32,bf16)
- ``MOECONF_ARCHS``: comma-separated model types (default: the whole registry)
- ``MOECONF_REQUIRE_DEVICE=1``: a missing device is an error instead of a skip
"""

from __future__ import annotations

import os

from moeconf.devices import use_threads_for_tiny_shapes
from moeconf.registry import REGISTRY

use_threads_for_tiny_shapes()

PARITY_BACKENDS = ("hf-eager", "hf-grouped-mm", "hf-batched-mm", "grouped-mm", "npu-gmm")


def matrix_from_env() -> tuple[str, list[str], list[str], list[str]]:
    """``(device, archs, backends, dtypes)`` selected by the environment."""

    def listed(name: str, default: list[str]) -> list[str]:
        value = os.environ.get(name, "")
        return [v.strip() for v in value.split(",") if v.strip()] or default

    device = os.environ.get("MOECONF_DEVICE", "cpu")
    archs = listed("MOECONF_ARCHS", sorted(REGISTRY))
    backends = listed("MOECONF_BACKENDS", list(PARITY_BACKENDS))
    dtypes = listed("MOECONF_DTYPES", ["fp32", "bf16"])
    return device, archs, backends, dtypes
