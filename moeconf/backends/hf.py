"""HF backends: the transformers MoE block as shipped, with a chosen experts implementation.

``hf-eager`` runs the experts class' own loop; ``hf-grouped-mm`` / ``hf-batched-mm`` switch
transformers' experts implementation (only experts classes decorated with
``@use_experts_implementation`` accept it; the others are reported unsupported).

``HFBlockBackend(name, patch=...)`` is also the easiest way for a framework to gate its own patched
block: ``patch(block, entry)`` may modify the block in place or return a replacement module. A
framework that picks its patch from the model (its config's ``architectures``, its module tree) gives
``model_patch(model, entry)`` instead: it gets a tiny full model, and the block it leaves at the
entry's block path is the one checked.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from moeconf.backends.base import EnvironmentFault, Observation, RunRequest
from moeconf.backends.dense import apply_dense_patch, dense_reason
from moeconf.devices import device_available
from moeconf.hf.block import (
    Recording,
    build_block,
    build_model_block,
    canonical_grads,
    cast_like_from_pretrained,
    framework_losses,
    load_params,
    loss_gradients,
    recording,
)
from moeconf.registry.entry import ArchEntry

BlockPatch = Callable[[nn.Module, ArchEntry], nn.Module | None]
ModelPatch = Callable[[nn.Module, ArchEntry], nn.Module | None]


class HFBlockBackend:
    """The transformers block for a registry entry, optionally patched.

    Args:
        name: backend name used in reports and on the command line.
        experts_implementation: ``"eager"``, ``"grouped_mm"`` or ``"batched_mm"``.
        patch: optional ``patch(block, entry) -> module | None`` applied after parameters are loaded.
            A returned replacement must keep the entry's parameter paths (gradients are read there).
        model_patch: optional ``model_patch(model, entry) -> model | None`` applied to a tiny full
            ``entry.model_class`` model before parameters are loaded; the block checked is the module
            at ``entry.block_path`` afterwards. Both patches may be given (model first).
    """

    devices = ("cpu", "cuda", "npu")
    dtypes = ("fp32", "bf16")

    def __init__(
        self,
        name: str,
        experts_implementation: str = "eager",
        patch: BlockPatch | None = None,
        model_patch: ModelPatch | None = None,
    ) -> None:
        self.name = name
        self.experts_implementation = experts_implementation
        self.patch = patch
        self.model_patch = model_patch

    def supports(self, entry: ArchEntry, dtype: str, device: str) -> str | None:
        if not device_available(device):
            return f"no {device} device"
        if self.experts_implementation not in entry.experts_implementations:
            return f"experts class of {entry.block_class} does not accept experts_implementation={self.experts_implementation!r}"
        return None

    def prepare(self, request: RunRequest) -> nn.Module:
        """Build the block, load the request's parameters, apply the patch; on the request's device/dtype."""
        if self.model_patch is not None:
            block = build_model_block(request.entry, self.experts_implementation, self.model_patch)
        else:
            block = build_block(request.entry, self.experts_implementation)
        load_params(request.entry, block, request.params)
        block = cast_like_from_pretrained(request.entry, block.to(request.device), request.dtype)
        if self.patch is not None:
            block = self.patch(block, request.entry) or block
        return block.train(request.entry.train_mode)

    def run(self, request: RunRequest) -> Observation:
        entry = request.entry
        block = self.prepare(request)
        hidden = request.hidden.to(device=request.device, dtype=request.dtype).requires_grad_(True)
        with recording(entry, block, request.token_types) as rec:
            out = _first(block(hidden, **token_type_kwargs(entry, request))).reshape(hidden.shape)
        aux, z, loss_errors = guarded_losses(entry, lambda: self.losses(entry, rec, request.attention_mask))
        # Before the output's backward: the losses' gradients are taken on their own graph.
        loss_grads = loss_gradients(entry, block, hidden, {"aux_loss": aux, "z_loss": z})
        out.backward(request.grad_output.to(device=request.device, dtype=request.dtype))

        grads, missing = canonical_grads(entry, block)
        grads["input"] = hidden.grad
        return observation_of(
            entry,
            rec,
            out,
            request.attention_mask,
            grads,
            missing,
            losses=(aux, z),
            loss_grads=loss_grads,
            loss_errors=loss_errors,
        )

    def losses(
        self, entry: ArchEntry, rec: Recording, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(aux_loss, z_loss)`` with their graphs, as the model computes them from what its
        recorder collected (a framework that computes its losses its own way overrides this)."""
        return framework_losses(entry, recorded_router_logits(entry, rec), attention_mask)


def token_type_kwargs(entry: ArchEntry, request: RunRequest) -> dict[str, torch.Tensor]:
    """The forward keyword carrying the request's token-type ids, for a block with token sets."""
    if entry.token_types_kwarg is None or request.token_types is None:
        return {}
    return {entry.token_types_kwarg: request.token_types.to(request.device)}


def recorded_router_logits(entry: ArchEntry, rec: Recording) -> list[torch.Tensor]:
    """The router logits the model's losses are computed from: what its recorder collected, or
    (no recorder to reuse) the router submodule's output."""
    if rec.recorded_logits is not None:
        return list(rec.recorded_logits)
    logits = rec.hooked_router_logits(entry)
    return [] if logits is None else [logits]


def guarded_losses(
    entry: ArchEntry, compute: Callable[[], tuple[torch.Tensor | None, torch.Tensor | None]]
) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, str]]:
    """``(aux_loss, z_loss, loss_errors)``: ``compute()``'s losses, or, where it raised, None for both
    and the exception (``Type: message at file:line``) under the name of every loss the architecture
    has.

    NOTE: the model's own loss computation raising is a fault of *those losses* (transformers 5.0-5.1
    recorded Qwen3-Next's block output as its router logits, and ``load_balancing_loss_func`` raised
    on it): the aux/z checks judge it (``Observation.loss_errors``), while the output, gradient and
    routing the block computed are judged as usual, not lost with the whole case as ``error``.
    """
    try:
        aux, z = compute()
    except EnvironmentFault:
        raise  # the machine's fault, not the losses'
    except Exception as exc:  # noqa: BLE001 - whatever the model's loss code raises is its verdict
        why = raised_where(exc)
        losses = entry.spec.losses
        names = [name for name, has in (("aux_loss", losses.aux != "none"), ("z_loss", losses.z_loss)) if has]
        return None, None, dict.fromkeys(names, why)
    return aux, z, {}


def raised_where(exc: BaseException) -> str:
    """``Type: first line of the message at file:line`` of the innermost frame (the code that raised)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}{where}" if text else f"{type(exc).__name__}{where}"


def observation_of(
    entry: ArchEntry,
    rec: Recording,
    output: torch.Tensor,
    attention_mask: torch.Tensor,
    grads: dict[str, torch.Tensor | None],
    missing: tuple[str, ...],
    losses: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    loss_grads: Mapping[str, dict[str, torch.Tensor | None]] | None = None,
    loss_errors: Mapping[str, str] | None = None,
) -> Observation:
    """What a HF block showed in one forward/backward: its output, the routing and router output
    its hooks recorded, the model's own aux/z losses from what the model's recorder collected
    (``losses`` and ``loss_errors`` when the caller computed them already, ``guarded_losses``), their
    gradients where the caller took them (``loss_gradients``, before the backward), and the parameter
    gradients. Shared by the single-process backends and every rank of the multi-rank ones."""
    index, weights = rec.routing(entry)
    if losses is not None:
        aux, z = losses
    else:
        aux, z, loss_errors = guarded_losses(
            entry, lambda: framework_losses(entry, recorded_router_logits(entry, rec), attention_mask)
        )
    loss_grads = loss_grads or {}
    return Observation(
        output=output.detach(),
        topk_index=index,
        topk_weights=_detach(weights),
        router_logits=_detach(rec.router_logits(entry)),
        aux_loss=_detach(aux),
        z_loss=_detach(z),
        recorded_router_logits=rec.recorded_count,
        aux_loss_grads=loss_grads.get("aux_loss"),
        z_loss_grads=loss_grads.get("z_loss"),
        grads=grads,
        missing_grads=missing,
        loss_errors=dict(loss_errors or {}),
    )


def _first(output: Any) -> torch.Tensor:
    """Blocks return a tensor, or ``(hidden, router_scores)`` (GPT-OSS, Llama-4)."""
    return output[0] if isinstance(output, tuple) else output


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.detach() if isinstance(t, torch.Tensor) else t


class DenseBlockBackend(HFBlockBackend):
    """``hf-dense``: the block with moeconf's dense patch (``moeconf.backends.dense``), single process.

    It is what ``zero2-dense`` / ``fsdp2-dense`` shard; checking it alone separates a patch bug from
    a partitioning bug.
    """

    def __init__(self, name: str = "hf-dense") -> None:
        super().__init__(name, "eager", patch=apply_dense_patch)

    def supports(self, entry: ArchEntry, dtype: str, device: str) -> str | None:
        return super().supports(entry, dtype, device) or dense_reason(entry)


HF_EAGER = HFBlockBackend("hf-eager", "eager")
HF_GROUPED_MM = HFBlockBackend("hf-grouped-mm", "grouped_mm")
HF_BATCHED_MM = HFBlockBackend("hf-batched-mm", "batched_mm")
HF_DENSE = DenseBlockBackend()
