"""LLaMA-Factory's NPU fused MoE kernel as a moeconf backend (``moeconf check --backend
clients.llamafactory.npu_backend:BACKEND``).

The block is transformers' as shipped (router, shared experts, parameters: moeconf's ``HFBlockBackend``);
the patch is a *model* patch (``HFBlockBackend(model_patch=...)``: it gets a tiny full model whose
``config.architectures`` is set as a checkpoint's) and does what ``NpuFusedMoEKernel.apply`` does in
``npu_fused_moe.py``: pick the mapping of ``kernel_moe_mapping`` for the first of the model's
``config.architectures`` it knows, and bind each mapped forward to every module of the mapped class
in the model (``module.forward = types.MethodType(fn, module)``). ``apply`` itself is not called: it refuses to
run unless the current accelerator is an NPU (``check_deps``), and on a CPU ``@register_kernel`` leaves
the class name bound to None. The ops are the real torch_npu on an Ascend device, moeconf's emulator
elsewhere (``loader.load_npu_fused_moe``), under the release rules of ``MOECONF_TORCH_NPU_RULES``.

Set ``MOECONF_LLAMAFACTORY_ROOT`` to the unpacked wheel (the nox session does).
"""

from __future__ import annotations

import types
from types import ModuleType

from torch import nn

from clients.llamafactory import loader
from moeconf.backends import BackendError, HFBlockBackend
from moeconf.registry.entry import ArchEntry


class LlamaFactoryNpuFusedMoe(HFBlockBackend):
    devices = ("cpu", "npu")
    dtypes = ("fp32", "bf16")

    def __init__(self, name: str = "llamafactory-npu-fused-moe") -> None:
        super().__init__(name, "eager", model_patch=self._apply)

    @staticmethod
    def kernel() -> ModuleType:
        return loader.load_npu_fused_moe(loader.root_from_env())

    def mapping(self, entry: ArchEntry) -> dict[str, object] | None:
        """``kernel_moe_mapping[architecture]``: module class name → the forward LLaMA-Factory binds."""
        return self.kernel().kernel_moe_mapping.get(entry.model_class)

    def supports(self, entry: ArchEntry, dtype: str, device: str) -> str | None:
        if device not in self.devices:
            return f"{self.name} does not run on {device}"
        if self.mapping(entry) is None:
            return f"LLaMA-Factory's npu_fused_moe does not patch {entry.model_class}"
        return super().supports(entry, dtype, device)

    def _apply(self, model: nn.Module, entry: ArchEntry) -> None:
        mappings = self.kernel().kernel_moe_mapping
        # npu_fused_moe.py, NpuFusedMoEKernel.apply: the first known architecture, then the same loop.
        archs = getattr(model.config, "architectures", None) or []
        mapping = next((mappings[a] for a in archs if a in mappings), None) or {}
        patched = []
        for module in model.modules():
            forward = mapping.get(module.__class__.__name__)
            if forward is not None:
                module.forward = types.MethodType(forward, module)
                patched.append(module.__class__.__name__)
        if not patched:
            raise BackendError(
                f"kernel_moe_mapping for {archs} names {sorted(mapping)}, none of which is in a tiny "
                f"{entry.model_class}: the kernel would leave this model unpatched"
            )


BACKEND = LlamaFactoryNpuFusedMoe()
