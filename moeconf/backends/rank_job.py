"""What each rank runs: build the registry block, wrap it with ZeRO-2/3 or FSDP2, run the cases and the
adversarial steps, and return what it saw (outputs, routing, full gathered gradients and parameters).

Runs inside ``moeconf.distributed.run_ranks`` (``torch.distributed`` already initialised, gloo on CPU).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from moeconf.backends.base import Observation, RunRequest, StepObservation, StepsRequest, micro_batches
from moeconf.backends.dense import apply_dense_patch
from moeconf.backends.hf import observation_of, recorded_router_logits
from moeconf.hf.block import (
    build_block,
    cast_like_from_pretrained,
    framework_losses,
    load_params,
    recording,
    to_canonical,
    trained_tensors,
)
from moeconf.params import Params
from moeconf.registry.entry import ArchEntry

Strategy = Literal["zero2", "zero3", "fsdp2"]


@dataclass(frozen=True)
class RankJob:
    """Everything a rank needs (picklable: the entry is data)."""

    entry: ArchEntry
    strategy: Strategy
    leaf: bool
    dense: bool
    dtype: torch.dtype
    cases: tuple[RunRequest, ...]
    steps: StepsRequest | None
    device: str = "cpu"
    """Where each rank runs: ``cpu`` (gloo), or its own ``cuda``/``npu`` device (NCCL/HCCL), selected
    by the launcher before the group formed."""


class Wrapper(nn.Module):
    """The block as a child, as in a model: ZeRO-3 leaves and FSDP units are submodules."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.block(hidden)
        return (out[0] if isinstance(out, tuple) else out).reshape(hidden.shape)


@dataclass
class Engine:
    model: nn.Module
    block: nn.Module
    step: Any
    backward: Any
    """``backward(loss)`` of one micro-batch: the engine divides it by the accumulation."""
    zero_grad: Any
    full_grad: Any
    full_param: Any
    micro_step: Any
    """After a micro-batch that is not the step's last (DeepSpeed counts micro-steps in ``step()``)."""


def _block(job: RankJob, params: Params) -> nn.Module:
    block = build_block(job.entry, "eager" if "eager" in job.entry.experts_implementations else None)
    load_params(job.entry, block, params)
    if job.dense:
        apply_dense_patch(block, job.entry)
    block = cast_like_from_pretrained(job.entry, block, job.dtype).train(job.entry.train_mode)
    return block.to(_device(job))


def _device(job: RankJob) -> torch.device:
    """This rank's device (the current CUDA/NPU device the launcher selected, or the CPU)."""
    if job.device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if job.device == "npu":
        return torch.device("npu", torch.npu.current_device())  # type: ignore[attr-defined]
    return torch.device("cpu")


def _deepspeed_engine(job: RankJob, block: nn.Module, lr: float, accumulation: int) -> Engine:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, set_z3_leaf_modules

    model = Wrapper(block)
    if job.leaf:
        set_z3_leaf_modules(model, [type(block)])
    stage = 3 if job.strategy == "zero3" else 2
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        # DeepSpeed divides each micro-batch's loss by this in backward() and steps on the last one
        "gradient_accumulation_steps": accumulation,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": stage},
        # NOTE: explicit, because DeepSpeed 0.19 clipped the global grad norm to 1.0 without it here,
        # which made plain SGD steps disagree with the reference by the grad norm (~57x).
        "gradient_clipping": 0.0,
        "bf16": {"enabled": job.dtype == torch.bfloat16},
    }
    if stage == 3:
        # NOTE: partition every parameter, however small: the tiny block would otherwise stay whole
        # ("persistent") on every rank and the fetch-order hang could not happen.
        config["zero_optimization"].update(
            stage3_param_persistence_threshold=0,
            stage3_prefetch_bucket_size=0,
            stage3_max_live_parameters=0,
            stage3_max_reuse_distance=0,
        )
        if not job.leaf:
            # NOTE: DeepSpeed >= 0.18 makes the Mixtral/Qwen2-MoE/Qwen3-MoE blocks leaves by default
            # (zero_optimization.leaf_module); the no-leaf control must switch that off explicitly.
            config["zero_optimization"]["leaf_module"] = {"classes": [], "names": [], "name_suffixes": []}
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return Engine(
        engine,
        block,
        engine.step,
        engine.backward,
        lambda: None,
        safe_get_full_grad,
        safe_get_full_fp32_param,
        engine.step,
    )


def _fsdp2_engine(job: RankJob, block: nn.Module, lr: float, accumulation: int) -> Engine:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(job.device, (dist.get_world_size(),))
    model = Wrapper(block)
    fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def full(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t

    return Engine(
        model,
        block,
        optimizer.step,
        lambda loss: (loss / accumulation).backward(),  # as a trainer does around plain FSDP2
        lambda: optimizer.zero_grad(set_to_none=True),
        lambda p: full(p.grad),
        lambda p: full(p.detach()),
        lambda: None,
    )


def _engine(job: RankJob, params: Params, lr: float, accumulation: int = 1) -> Engine:
    block = _block(job, params)
    build = _fsdp2_engine if job.strategy == "fsdp2" else _deepspeed_engine
    return build(job, block, lr, accumulation)


def _gathered(job: RankJob, engine: Engine, get: Any) -> tuple[dict[str, torch.Tensor | None], tuple[str, ...]]:
    tensors = {path: get(p) for path, p in trained_tensors(job.entry, engine.block).items()}
    return to_canonical(
        job.entry, {k: (v.detach().cpu().float() if v is not None else None) for k, v in tensors.items()}
    )


def _forward_backward(
    job: RankJob,
    engine: Engine,
    hidden: torch.Tensor,
    grad_output: torch.Tensor,
    steps: StepsRequest | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Any, dict[str, float | None]]:
    """One forward and backward of ``⟨out, G⟩`` (plus, for ``steps`` that weigh them, the router
    losses of these tokens): the output, the input's gradient, the recording, the router losses."""
    device = _device(job)
    # NOTE: a ZeRO-3 leaf needs an input that requires grad
    x = hidden.to(device=device, dtype=job.dtype).requires_grad_(True)
    with recording(job.entry, engine.block) as rec:
        out = engine.model(x)
    loss = (out.float() * grad_output.to(device).float()).sum()
    seen: dict[str, float | None] = {}
    if steps is not None and steps.weighs_router_losses:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=device)
        aux, z = framework_losses(job.entry, recorded_router_logits(job.entry, rec), mask)
        loss, seen = step_loss(steps, loss, {"aux_loss": aux, "z_loss": z})
    engine.backward(loss)
    return out.detach(), x.grad, rec, seen


def step_loss(
    steps: StepsRequest, loss: torch.Tensor, losses: dict[str, torch.Tensor | None]
) -> tuple[torch.Tensor, dict[str, float | None]]:
    """A micro-batch's loss: ``⟨out, G⟩ + aux_coef·aux + z_coef·z`` (the engine divides it by the
    accumulation and averages the gradients over ranks), and the router losses' values as seen."""
    seen: dict[str, float | None] = {}
    for name, coef in (("aux_loss", steps.aux_coef), ("z_loss", steps.z_coef)):
        if coef == 0.0:
            continue
        value = losses[name]
        seen[name] = None if value is None else float(value)
        if value is not None:
            loss = loss + coef * value.float()
    return loss, seen


def run_case(job: RankJob, case: RunRequest) -> Observation:
    """One replicated batch (every rank sees the same tokens): output, routing, losses, full grads."""
    engine = _engine(job, case.params, lr=0.0)
    out, grad_input, rec, _ = _forward_backward(job, engine, case.hidden, case.grad_output)
    grads, missing = _gathered(job, engine, engine.full_grad)
    grads["input"] = grad_input
    return _on_cpu(observation_of(job.entry, rec, out, case.attention_mask.to(_device(job)), grads, missing))


def _on_cpu(obs: Observation) -> Observation:
    """The observation with every tensor on the CPU: it is pickled back to a parent that may have no
    accelerator (and must not hold the ranks' device memory)."""

    def cpu(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().cpu()
        if isinstance(value, dict):
            return {k: cpu(v) for k, v in value.items()}
        return value

    return dataclasses.replace(obs, **{f.name: cpu(getattr(obs, f.name)) for f in dataclasses.fields(obs)})


def run_steps(job: RankJob, steps: StepsRequest) -> list[StepObservation]:
    """The adversarial steps: this rank's batch per step (in ``steps.accumulation`` micro-batches),
    gathered full grads and params after each step, the router losses it weighed."""
    rank = dist.get_rank()
    engine = _engine(job, steps.params, lr=steps.lr, accumulation=steps.accumulation)
    seen = []
    for batch, grad_output in zip(steps.batches, steps.grad_outputs):
        micro = list(
            zip(micro_batches(batch[rank], steps.accumulation), micro_batches(grad_output[rank], steps.accumulation))
        )
        outputs, losses = [], {}  # type: ignore[var-annotated]
        for m, (x, g) in enumerate(micro):
            out, _, _, micro_losses = _forward_backward(job, engine, x, g, steps)
            outputs.append(out)
            for name, value in micro_losses.items():
                losses.setdefault(name, []).append(value)
            if m < len(micro) - 1:
                engine.micro_step()
        step_grads, step_missing = _gathered(job, engine, engine.full_grad)
        engine.step()
        engine.zero_grad()
        params_after = _gathered(job, engine, engine.full_param)[0]
        output = torch.cat(outputs, dim=1).cpu()
        seen.append(StepObservation(output, step_grads, step_missing, params_after, losses))
    return seen


@dataclass
class RankResult:
    """What one rank returns to the launcher (picklable)."""

    rank: int
    cases: list[Observation]
    steps: list[StepObservation] | None


def run_job(job: RankJob) -> RankResult:
    """The rank function given to ``run_ranks``."""
    torch.manual_seed(0)
    with _quiet():
        cases = [run_case(job, case) for case in job.cases]
        steps = run_steps(job, job.steps) if job.steps is not None else None
    return RankResult(dist.get_rank(), cases, steps)


@contextmanager
def _quiet() -> Iterator[None]:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    yield
