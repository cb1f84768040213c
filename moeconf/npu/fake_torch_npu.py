"""Let the emulator stand in for the ``torch_npu`` module, so ``import torch_npu`` code runs unchanged on a CPU.

- ``emulated_torch_npu(version=None)``: context manager that installs the emulator as ``sys.modules["torch_npu"]``
  and restores the previous state on exit (a real torch_npu and its submodules, or nothing). ``version`` selects the
  torch_npu release whose rules the ops enforce (``"6.0"``, ``"7.0"``; default: ``$MOECONF_TORCH_NPU_RULES``, else
  the newest documented rules); see docs/torch-npu-ops.md, 'Release rules'.
- ``torch_npu_emulator``: the same as a pytest fixture (``from moeconf.npu.fake_torch_npu import torch_npu_emulator``).
- ``get_torch_npu(device)``: the real torch_npu for an NPU device when it imports, else the emulator module.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import sys
from collections.abc import Iterator
from types import ModuleType

import torch

from moeconf.npu import emulator

__all__ = [
    "EMULATED_OPS",
    "emulated_torch_npu",
    "emulator_module",
    "get_torch_npu",
    "is_emulator",
    "torch_npu_emulator",
]

MODULE_NAME = "torch_npu"
EMULATED_OPS = ("npu_moe_token_permute", "npu_moe_token_unpermute", "npu_grouped_matmul", "npu_swiglu")
_EMULATOR_VERSION = "0.0.0+moeconf.emulator"

_cached_module: ModuleType | None = None


def _build_module() -> ModuleType:
    module = ModuleType(MODULE_NAME, "moeconf pure-torch emulator of the torch_npu MoE ops.")
    # A spec makes importlib.util.find_spec("torch_npu") answer like an installed module; no __path__, so
    # `import torch_npu.<sub>` fails instead of silently reaching a real submodule.
    module.__spec__ = importlib.machinery.ModuleSpec(MODULE_NAME, loader=None)
    module.__dict__.update(
        __version__=_EMULATOR_VERSION,
        __moeconf_emulator__=True,
        __all__=list(EMULATED_OPS),
        **{name: getattr(emulator, name) for name in EMULATED_OPS},
    )
    return module


def emulator_module() -> ModuleType:
    """The (shared) module object that plays ``torch_npu``; its attributes are the emulated ops."""
    global _cached_module
    if _cached_module is None:
        _cached_module = _build_module()
    return _cached_module


def is_emulator(module: object) -> bool:
    """True for the emulator module (``__moeconf_emulator__ = True``), False for a real torch_npu."""
    return getattr(module, "__moeconf_emulator__", False) is True


def _torch_npu_entries() -> list[str]:
    return [name for name in sys.modules if name == MODULE_NAME or name.startswith(MODULE_NAME + ".")]


@contextlib.contextmanager
def emulated_torch_npu(version: str | None = None) -> Iterator[ModuleType]:
    """Install the emulator as ``torch_npu`` in ``sys.modules`` for the duration of the block.

    Real ``torch_npu`` / ``torch_npu.*`` entries are hidden inside the block and put back on exit, even on error;
    anything ``torch_npu``-named imported inside the block is removed. Nesting works.

    Args:
        version: torch_npu release whose rules the ops enforce inside the block (``"6.0"``, ``"7.0.0"``, ...; a
            release uses the newest documented rules not newer than it). None keeps the rules in force: an outer
            block's, else ``$MOECONF_TORCH_NPU_RULES``, else the newest documented rules. An unknown release raises
            ``ValueError`` before anything is installed.
    """
    rules = emulator.resolve_rules(version)  # validates version (or the environment variable) up front
    saved = {name: sys.modules.pop(name) for name in _torch_npu_entries()}
    module = emulator_module()
    sys.modules[MODULE_NAME] = module
    try:
        with emulator.torch_npu_rules(rules):
            yield module
    finally:
        for name in _torch_npu_entries():
            del sys.modules[name]
        sys.modules.update(saved)


def _torch_npu_emulator() -> Iterator[ModuleType]:
    """pytest fixture: yields the emulator module while it is installed as ``torch_npu``."""
    with emulated_torch_npu() as module:
        yield module


try:
    import pytest
except ImportError:  # pytest is a test-time dependency only; without it the fixture is a plain generator
    torch_npu_emulator = _torch_npu_emulator
else:
    torch_npu_emulator = pytest.fixture(name="torch_npu_emulator")(_torch_npu_emulator)


def _device_type(device: str | torch.device | None) -> str | None:
    # Parse strings by hand: torch.device("npu") fails on a build without torch_npu.
    if device is None:
        return None
    if isinstance(device, torch.device):
        return device.type
    return str(device).split(":", 1)[0].strip().lower()


def get_torch_npu(device: str | torch.device | None = None) -> ModuleType:
    """The module that provides the NPU MoE ops for ``device``.

    Returns the real ``torch_npu`` when ``device`` is an NPU (``"npu"``, ``"npu:0"``, ``torch.device("npu", 0)``)
    and ``import torch_npu`` succeeds; otherwise (any other device, or torch_npu missing) the emulator module.
    """
    if _device_type(device) != "npu":
        return emulator_module()
    try:
        return importlib.import_module(MODULE_NAME)
    except ImportError:
        return emulator_module()
