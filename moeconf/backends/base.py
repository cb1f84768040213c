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
from typing import Literal, Protocol, runtime_checkable

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
        token_types: ``[B, S]`` int64 token-type ids choosing each token's expert set, for an entry
            whose spec has ``token_sets`` (the block gets them as ``entry.token_types_kwarg``); None
            for every other entry.
    """

    entry: ArchEntry
    params: Params
    hidden: torch.Tensor
    attention_mask: torch.Tensor
    grad_output: torch.Tensor
    dtype: torch.dtype
    device: str
    token_types: torch.Tensor | None = None


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
        recorded_router_logits: how many router-logit tensors the framework's recorder collected
            from the block in the forward (the model computes its losses from them): 1 is right; 0
            means the layer drops out of the aux loss, 2 that it counts twice. None: not observed.
        aux_loss_grads: gradient of ``aux_loss`` itself w.r.t. ``"input"`` and the router's trained
            parameters (canonical ``router.*`` names), taken on the loss's own graph; None values
            where the loss does not reach them (it cannot train the router). None: not observed.
        z_loss_grads: the same for ``z_loss``.
        grads: canonical parameter name (and ``"input"``) → gradient; None where the framework left
            ``.grad`` unset.
        missing_grads: per-expert slices whose ``.grad`` was None, e.g. ``"experts.w_up[3]"`` (an
            unrouted expert of a per-expert ModuleList: the ZeRO-2/FSDP hang, DeepSpeed #5066); their
            slice in ``grads`` holds zeros.
        loss_errors: ``"aux_loss"`` / ``"z_loss"`` → what the framework's own computation of that
            loss raised (``Type: message at file:line``); the loss is then None and its checks fail
            with this message, while the other checks judge the rest of the observation.
    """

    output: torch.Tensor
    topk_index: torch.Tensor | None = None
    topk_weights: torch.Tensor | None = None
    router_logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    recorded_router_logits: int | None = None
    aux_loss_grads: dict[str, torch.Tensor | None] | None = None
    z_loss_grads: dict[str, torch.Tensor | None] | None = None
    grads: dict[str, torch.Tensor | None] = field(default_factory=dict)
    missing_grads: tuple[str, ...] = ()
    loss_errors: dict[str, str] = field(default_factory=dict)


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


def micro_batches(t: torch.Tensor, accumulation: int) -> list[torch.Tensor]:
    """``[B, S, ...]`` split into ``accumulation`` equal parts along the sequence: a rank's
    micro-batches (``StepsRequest.accumulation``), for the backend and the reference alike."""
    return list(torch.chunk(t, accumulation, dim=1))


@dataclass(frozen=True)
class StepsRequest:
    """A multi-step data-parallel run (the ``adversarial_steps`` case of multi-rank backends).

    Attributes:
        params: canonical float64 parameters before step 0.
        batches: ``[step][rank]`` block inputs ``[B, S, H]`` (float64).
        grad_outputs: ``[step][rank]`` cotangents; rank ``r`` backpropagates ``⟨out_r, G_r⟩`` and the
            framework averages gradients over ranks.
        lr: plain SGD learning rate (no momentum, no weight decay).
        accumulation: micro-batches per rank and step (gradient accumulation): the rank splits its
            batch and cotangent into this many equal parts along the sequence, backpropagates each
            micro-batch's loss divided by ``accumulation``, and steps once.
        aux_coef, z_coef: weights of the aux and z losses in each micro-batch's loss, which is then
            ``⟨out_m, G_m⟩ + aux_coef·aux_m + z_coef·z_m`` with ``aux_m``/``z_m`` computed by the
            model's own loss functions from the router logits of that micro-batch's tokens.
            0 (the default): the losses are not part of the loss.

    So the step's gradient is the rank- and micro-batch mean of the micro-batch losses: the
    effective aux coefficient is ``aux_coef`` whatever the world size and the accumulation.
    """

    entry: ArchEntry
    params: Params
    batches: tuple[tuple[torch.Tensor, ...], ...]
    grad_outputs: tuple[tuple[torch.Tensor, ...], ...]
    lr: float
    dtype: torch.dtype
    device: str
    accumulation: int = 1
    aux_coef: float = 0.0
    z_coef: float = 0.0

    @property
    def world_size(self) -> int:
        return len(self.batches[0])

    @property
    def weighs_router_losses(self) -> bool:
        return self.aux_coef != 0.0 or self.z_coef != 0.0


@dataclass
class StepObservation:
    """One rank's view of one optimizer step: its output, and the full (gathered) grads and params."""

    output: torch.Tensor
    grads: dict[str, torch.Tensor | None]
    missing_grads: tuple[str, ...]
    params_after: dict[str, torch.Tensor | None]
    losses: dict[str, list[float | None]] = field(default_factory=dict)
    """The router losses this rank put in its loss, per micro-batch: ``"aux_loss"``/``"z_loss"`` →
    ``[accumulation]`` values (None: the model computed none); empty when it weighed none."""


@dataclass
class StepsObservation:
    """What the ranks saw: ``outputs[step][rank]``; grads and params (gathered, identical on every
    rank) as rank 0 saw them; ``losses[step][rank]`` (see ``StepObservation.losses``), None when the
    backend does not report them."""

    outputs: list[list[torch.Tensor]]
    grads: list[dict[str, torch.Tensor | None]]
    missing_grads: list[tuple[str, ...]]
    params_after: list[dict[str, torch.Tensor | None]]
    losses: list[list[dict[str, list[float | None]]]] | None = None


def steps_observation(per_rank: list[list[StepObservation]]) -> StepsObservation:
    """``per_rank[rank][step]`` assembled: every rank's outputs and losses; grads and params (gathered,
    identical on every rank) as rank 0 saw them."""
    lead = per_rank[0]
    steps = range(len(lead))
    return StepsObservation(
        outputs=[[rank[s].output for rank in per_rank] for s in steps],
        grads=[s.grads for s in lead],
        missing_grads=[s.missing_grads for s in lead],
        params_after=[s.params_after for s in lead],
        losses=[[rank[s].losses for rank in per_rank] for s in steps],
    )


@runtime_checkable
class MultiRankBackend(Backend, Protocol):
    """A backend that runs on several ranks: every case of an architecture plus the adversarial
    steps in one launch. It reports a hang or a dead rank by raising ``RankFailure``."""

    def run_session(
        self, requests: list[RunRequest], steps: StepsRequest | None
    ) -> tuple[list[Observation], StepsObservation | None]:
        """Observations of ``requests`` (in order) and of ``steps`` (None when not asked)."""
        ...


def is_multi_rank(backend: Backend) -> bool:
    """Whether the engine gives ``backend`` whole sessions (and the adversarial steps)."""
    return isinstance(backend, MultiRankBackend)


class BackendError(RuntimeError):
    """The backend could not run the request (reported as ``error``, not as a failed check)."""


class EnvironmentFault(RuntimeError):
    """A fault outside the code under test (a stale build lock, an unwritable cache or HOME, a
    missing optional dependency, no free port): reported as ``setup``, never as ``fail``."""


FailureKind = Literal["hang", "crash"]


class RankFailure(Exception):
    """A multi-rank run that did not finish because of the code under test: ranks that hang
    (``kind="hang"``) or a rank that died or raised (``kind="crash"``); a failed check.

    Attributes:
        kind: ``"hang"`` or ``"crash"``.
        summary: one line: what happened, which rank, which signal or exception.
        detail: every rank's exit status, traceback, Python stack and last log lines.
    """

    def __init__(self, kind: FailureKind, summary: str, detail: str, run_id: str = "") -> None:
        super().__init__(f"{summary}\n{detail}")
        self.kind = kind
        self.summary = summary
        self.detail = detail
        self.run_id = run_id
        """The launch's ``MOECONF_RUN_ID`` (to verify that no process outlived it)."""
