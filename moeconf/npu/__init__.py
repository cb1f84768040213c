"""Pure-torch emulator of the torch_npu MoE ops, so NPU MoE code runs unchanged on a CPU.

``emulator`` implements ``npu_moe_token_permute``, ``npu_moe_token_unpermute``, ``npu_grouped_matmul`` and
``npu_swiglu`` with torch_npu's signatures, semantics and rejections (docs/torch-npu-ops.md), under the rules of a
selectable torch_npu release (``torch_npu_rules``, ``current_rules``; default: the newest documented release);
``fake_torch_npu`` installs them as the ``torch_npu`` module (context manager, pytest fixture, ``get_torch_npu``).
"""

from moeconf.npu.emulator import (
    DEFAULT_RULES,
    RULES,
    RULES_ENV,
    NpuOpRejected,
    TorchNpuRules,
    current_rules,
    grouped_matmul_autograd,
    npu_grouped_matmul,
    npu_moe_token_permute,
    npu_moe_token_unpermute,
    npu_swiglu,
    resolve_rules,
    torch_npu_rules,
)

_FAKE_MODULE_NAMES = ("emulated_torch_npu", "emulator_module", "get_torch_npu", "is_emulator")


def __getattr__(name: str) -> object:
    # Lazy: fake_torch_npu imports pytest (for its fixture), which plain users of the ops should not pay for.
    if name in _FAKE_MODULE_NAMES:
        from moeconf.npu import fake_torch_npu

        return getattr(fake_torch_npu, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_RULES",
    "RULES",
    "RULES_ENV",
    "NpuOpRejected",
    "TorchNpuRules",
    "current_rules",
    "emulated_torch_npu",
    "emulator_module",
    "get_torch_npu",
    "grouped_matmul_autograd",
    "is_emulator",
    "npu_grouped_matmul",
    "npu_moe_token_permute",
    "npu_moe_token_unpermute",
    "npu_swiglu",
    "resolve_rules",
    "torch_npu_rules",
]
