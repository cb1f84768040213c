"""Devices and dtypes by the names used on the command line, and moeconf's ``MOECONF_*`` settings.

Settings are read from the environment *when used*, never at import, and every read goes through
``setting()``: a value moeconf cannot use raises ``SettingError`` naming the variable, the value and
what is expected. ``check_settings()`` validates them all at once, so the command line can refuse a
bad environment in one line before any work starts (a traceback at import would blame nobody).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICES = ("cpu", "cuda", "npu")

T = TypeVar("T")


class SettingError(ValueError):
    """A ``MOECONF_*`` environment variable holds a value moeconf cannot use (a usage error)."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(text)
    return value


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One ``MOECONF_*`` variable: its default (as text, as a user would write it) and its parser."""

    name: str
    default: str
    parse: Callable[[str], T]
    expected: str
    """What a valid value looks like, for the error message."""


THREADS: Setting[int] = Setting("MOECONF_THREADS", "1", _positive_int, "a whole number of threads >= 1")
DEADLINE_S: Setting[float] = Setting(
    "MOECONF_DEADLINE_S", "120", _positive_seconds, "seconds > 0 before a multi-rank launch counts as hung"
)
SETTINGS: tuple[Setting[int] | Setting[float], ...] = (THREADS, DEADLINE_S)
"""Every variable that changes what ``moeconf check`` does (the suites' selection variables are
validated where the suites read them)."""


def setting(spec: Setting[T]) -> T:
    """The variable's value (its default when unset or empty), or ``SettingError``."""
    raw = os.environ.get(spec.name, "").strip()
    try:
        return spec.parse(raw or spec.default)
    except (ValueError, OverflowError):
        raise SettingError(f"{spec.name}={raw!r}: expected {spec.expected}") from None


def check_settings() -> None:
    """Validate every ``MOECONF_*`` setting now; the first bad one raises ``SettingError``."""
    for spec in SETTINGS:
        setting(spec)


def intra_op_threads() -> int:
    """``MOECONF_THREADS`` (default 1)."""
    return setting(THREADS)


def rank_deadline_s() -> float:
    """``MOECONF_DEADLINE_S`` (default 120): how long a multi-rank launch may run before it is a hang."""
    return setting(DEADLINE_S)


def device_available(device: str) -> bool:
    """Whether ``device`` can run here (NPU needs ``torch_npu`` and a visible Ascend device)."""
    if device == "cpu":
        return True
    if device == "cuda":
        return torch.cuda.is_available()
    if device == "npu":
        if importlib.util.find_spec("torch_npu") is None:
            return False
        import torch_npu  # noqa: F401  (registers torch.npu)

        return bool(getattr(torch, "npu", None)) and torch.npu.is_available()
    return False


def device_count(device: str) -> int:
    """How many ``device`` devices the ranks can be spread over (CPU: any number of ranks share it)."""
    if not device_available(device):
        return 0
    if device == "cuda":
        return torch.cuda.device_count()
    if device == "npu":
        return int(torch.npu.device_count())  # type: ignore[attr-defined]
    return 1 << 30


def use_threads_for_tiny_shapes() -> None:
    """One intra-op thread unless ``MOECONF_THREADS`` says otherwise (``SettingError`` if invalid).

    NOTE: the checks run thousands of tiny matmuls; on a 2-core machine a second intra-op thread
    made ``moeconf check`` 3-5x slower (thread hand-off costs more than the op), and pytest-xdist
    workers already use the cores.
    """
    torch.set_num_threads(intra_op_threads())
