"""The Backend protocol: how moeconf runs *the code under test*.

A backend is anything with a ``name``, capability flags, ``supports()`` and ``run()``. It receives
canonical parameters and tokens (``RunRequest``), runs its MoE implementation forward and backward,
and reports what it observed (``Observation``) under canonical names. It knows nothing about
checks or the reference: data flows one way, from backend to checks.

Outside code plugs in with ``moeconf check --backend package.module:attr`` or an entry point in the
``moeconf.backends`` group; ``attr`` may be a backend object, a class, or a zero-argument factory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from moeconf.params import Params
from moeconf.registry.entry import ArchEntry


@dataclass(frozen=True)
class RunRequest:
    """One forward+backward to run.

    Attributes:
        entry: the architecture (tiny config, spec, parameter bindings).
        params: canonical parameters, float64 on CPU; the backend casts them to ``dtype``/``device``.
        hidden: ``[B, S, H]`` float64 block input.
        attention_mask: ``[B, S]`` 1 = real token, 0 = padding; only the aux/z losses use it.
        grad_output: ``[B, S, H]`` float64 cotangent; backpropagate ``⟨output, grad_output⟩``.
        dtype: compute dtype of the backend (parameters and input are cast to it).
        device: ``"cpu"``, ``"cuda"``, ``"npu"``.
    """

    entry: ArchEntry
    params: Params
    hidden: torch.Tensor
    attention_mask: torch.Tensor
    grad_output: torch.Tensor
    dtype: torch.dtype
    device: str


@dataclass
class Observation:
    """What a backend saw. Any field it cannot observe stays None (its check is then skipped).

    Attributes:
        output: ``[B, S, H]`` block output.
        topk_index: ``[N, k]`` experts each token was sent to (any order within a token).
        topk_weights: ``[N, k]`` routing weights aligned with ``topk_index``.
        router_logits: ``[N, E]`` what the framework records as router logits (``output_router_logits``).
        aux_loss: load-balancing loss as the framework computes it from its recorded router output.
        z_loss: router z-loss as the framework computes it.
        grads: canonical parameter name (and ``"input"``) → gradient; None where the framework left
            ``.grad`` unset.
        missing_grads: per-expert slices whose ``.grad`` was None, e.g. ``"experts.w_up[3]"`` (an
            unrouted expert of a per-expert ModuleList: the ZeRO-2/FSDP hang, DeepSpeed #5066); their
            slice in ``grads`` holds zeros.
    """

    output: torch.Tensor
    topk_index: torch.Tensor | None = None
    topk_weights: torch.Tensor | None = None
    router_logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    grads: dict[str, torch.Tensor | None] = field(default_factory=dict)
    missing_grads: tuple[str, ...] = ()


@runtime_checkable
class Backend(Protocol):
    """The public extension point. Minimal example (see README, "Add a backend")::

    class MyBackend:
        name = "my-kernel"
        devices = ("cpu", "cuda")
        dtypes = ("fp32", "bf16")

        def supports(self, entry, dtype, device):
            return None if entry.spec.experts.glu == "swiglu" else "only SwiGLU experts"

        def run(self, request):
            ...  # build, load request.params, forward, backward
            return Observation(output=out, topk_index=idx, topk_weights=w, grads=grads)
    """

    name: str
    devices: tuple[str, ...]
    dtypes: tuple[str, ...]

    def supports(self, entry: ArchEntry, dtype: str, device: str) -> str | None:
        """None when this backend can run ``entry``; otherwise a one-line reason (reported as skip)."""
        ...

    def run(self, request: RunRequest) -> Observation:
        """Run forward and backward once and report the observation."""
        ...


class BackendError(RuntimeError):
    """The backend could not run the request (reported as ``error``, not as a failed check)."""
