"""Observation validation: what a backend returned is checked for form before any check reads it.

A malformed observation (wrong type, shape, dtype, device, an index out of range) is the backend
adapter's fault, not a numerical disagreement of the MoE code: it becomes one ``error`` record per
check naming the field, the expected form and what came back, and never crashes the run. Non-finite
*values* are not a form problem: they are the code under test computing garbage, so the checks
report them as ``fail``.

Dtypes. A backend must compute in the requested dtype: one that computes in float64 when asked for
bf16 passes every bf16 tolerance without testing any bf16 arithmetic. What is held to which dtype
was measured over the registry (hf-eager, hf-dense, grouped-mm, npu-gmm; bf16 and fp32):

- ``output`` and ``grads["input"]`` must be exactly the compute dtype: they are the forward's result
  and the gradient of the forward's input, so they prove the block ran in it. Every backend does.
- Router-side values (``topk_weights``, ``router_logits``, ``aux_loss``, ``z_loss``) and parameter
  gradients may be the compute dtype or float32, never anything else: transformers keeps some
  routers in float32 by design (``_keep_in_fp32_modules_strict``, a float32 softmax; 50 of 85 types
  in bf16), losses are float32, and frameworks accumulate parameter gradients in float32 (ZeRO's and
  FSDP's gathered master grads, Megatron's ``main_grad``). float64 is never legitimate: it is the
  reference's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from moeconf.backends.base import Observation, RunRequest, StepsObservation, StepsRequest
from moeconf.params import NOT_TRAINED, param_shapes


class MalformedObservation(ValueError):
    """The observation does not have the documented form; the message names the field."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe(value: object) -> str:
    """What a value is, for a message: a tensor's dtype, shape and device; a scalar's value; a type."""
    if isinstance(value, torch.Tensor):
        where = "" if value.device.type == "cpu" else f" on {value.device}"
        return f"a {_dtype_name(value.dtype)} tensor of shape {list(value.shape)}{where}"
    if value is None or isinstance(value, bool | int | float | str):
        return f"{type(value).__name__} {value!r}"
    if isinstance(value, list | tuple):
        return f"a {type(value).__name__} of {len(value)}"
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _tensor(name: str, value: object, devices: Sequence[str]) -> torch.Tensor:
    """``value`` if it is a dense tensor whose data is on one of ``devices`` (so checks can read it)."""
    if not isinstance(value, torch.Tensor):
        raise MalformedObservation(f"{name}: expected a torch.Tensor, got {describe(value)}")
    if value.layout != torch.strided:
        raise MalformedObservation(f"{name}: expected a dense (strided) tensor, got layout {value.layout}")
    if value.device.type not in devices:
        raise MalformedObservation(
            f"{name}: expected a tensor on {' or '.join(dict.fromkeys(devices))}, got {describe(value)}"
        )
    return value


def _shape(name: str, value: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(value.shape) != shape:
        raise MalformedObservation(f"{name}: expected shape {list(shape)}, got {describe(value)}")


def _dtype(name: str, value: torch.Tensor, allowed: Sequence[torch.dtype], why: str) -> None:
    if value.dtype not in allowed:
        wanted = " or ".join(dict.fromkeys(_dtype_name(d) for d in allowed))
        raise MalformedObservation(f"{name}: expected {wanted} ({why}), got {describe(value)}")


class _Form:
    """The forms expected for one request: dtypes and devices."""

    def __init__(self, request: RunRequest) -> None:
        self.compute = (request.dtype,)
        self.router = (request.dtype, torch.float32)
        # The output must be where it was asked to run (it proves the block ran there); anything
        # else may also come back on the host (gathered grads, losses read with .cpu()).
        self.device = (torch.device(request.device).type,)
        self.readable = (*self.device, "cpu")


def _scalar(name: str, value: object, form: _Form) -> None:
    if value is None:
        return
    tensor = _tensor(name, value, form.readable)
    _dtype(name, tensor, form.router, "the compute dtype, or float32 for a loss")
    if tensor.numel() != 1:
        raise MalformedObservation(f"{name}: expected a scalar (one element), got {describe(tensor)}")


def _routing(obs: Observation, tokens: int, top_k: int, width: int, form: _Form) -> None:
    if obs.topk_index is not None:
        index = _tensor("topk_index", obs.topk_index, form.readable)
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise MalformedObservation(f"topk_index: expected an integer tensor, got {describe(index)}")
        # NOTE: [N, k'] with k' ≠ k is a well-formed observation of a block that routes to the wrong number
        # of experts (one that hard-codes k): the routing checks judge it (fail), it is not the adapter's error.
        if index.dim() != 2 or index.shape[0] != tokens or index.shape[1] < 1:
            raise MalformedObservation(f"topk_index: expected shape [{tokens}, k] (k = {top_k}), got {describe(index)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= width):
            raise MalformedObservation(
                f"topk_index: expert ids must lie in [0, {width}), got [{int(index.min())}, {int(index.max())}]"
            )
    router_why = "the compute dtype, or float32 for a router kept in float32"
    if obs.topk_weights is not None:
        weights = _tensor("topk_weights", obs.topk_weights, form.readable)
        _dtype("topk_weights", weights, form.router, router_why)
        picks = obs.topk_index.shape[-1] if isinstance(obs.topk_index, torch.Tensor) else top_k
        _shape("topk_weights", weights, (tokens, picks))
    if obs.router_logits is not None:
        logits = _tensor("router_logits", obs.router_logits, form.readable)
        _dtype("router_logits", logits, form.router, router_why)
        if logits.dim() != 2 or logits.shape[0] != tokens:
            raise MalformedObservation(f"router_logits: expected shape [{tokens}, E], got {describe(logits)}")


def _grads(grads: object, expected: Mapping[str, tuple[int, ...]], form: _Form, what: str = "grads") -> None:
    if not isinstance(grads, Mapping):
        raise MalformedObservation(f"{what}: expected a dict of canonical name -> tensor, got {describe(grads)}")
    for name, grad in grads.items():
        if name not in expected:
            known = ", ".join(expected)
            raise MalformedObservation(f"{what}: unknown parameter {name!r} (canonical names: {known})")
        if grad is None or name in NOT_TRAINED:  # a buffer's grad is never compared
            continue
        field = f"{what}[{name!r}]"
        tensor = _tensor(field, grad, form.readable)
        if name == "input":
            _dtype(field, tensor, form.compute, "the compute dtype: the input's gradient has the input's dtype")
        else:
            _dtype(field, tensor, form.router, "the compute dtype, or float32 for accumulated parameter grads")
        _shape(field, tensor, expected[name])


def _missing_grads(value: object) -> None:
    if not isinstance(value, tuple | list) or not all(isinstance(m, str) for m in value):
        raise MalformedObservation(f"missing_grads: expected a tuple of str, got {describe(value)}")


def _loss_errors(value: object) -> None:
    if not isinstance(value, Mapping) or not all(
        name in ("aux_loss", "z_loss") and isinstance(why, str) and why for name, why in value.items()
    ):
        raise MalformedObservation(
            f"loss_errors: expected a dict of 'aux_loss' / 'z_loss' -> what raised (str), got {describe(value)}"
        )


def validate_observation(obs: object, request: RunRequest) -> Observation:
    """``obs`` if it has the documented form for ``request``; else ``MalformedObservation``."""
    if not isinstance(obs, Observation):
        raise MalformedObservation(f"run() returned {describe(obs)}, expected moeconf.backends.Observation")
    spec = request.entry.spec
    form = _Form(request)
    hidden_shape = tuple(request.hidden.shape)
    tokens = request.hidden.shape[0] * request.hidden.shape[1]
    output = _tensor("output", obs.output, form.device)
    _dtype("output", output, form.compute, "the requested compute dtype")
    _shape("output", output, hidden_shape)
    _routing(obs, tokens, spec.top_k, spec.router_width, form)
    _scalar("aux_loss", obs.aux_loss, form)
    _scalar("z_loss", obs.z_loss, form)
    expected = {**param_shapes(spec), "input": hidden_shape}
    _grads(obs.grads, expected, form)
    _missing_grads(obs.missing_grads)
    _loss_errors(obs.loss_errors)
    # The losses' own gradients: w.r.t. the input and the router's parameters only.
    router = {k: v for k, v in expected.items() if k == "input" or k.startswith("router.")}
    for what in ("aux_loss_grads", "z_loss_grads"):
        if getattr(obs, what) is not None:
            _grads(getattr(obs, what), router, form, what)
    count = obs.recorded_router_logits
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise MalformedObservation(f"recorded_router_logits: expected an int >= 0 or None, got {describe(count)}")
    return obs


def validate_steps(obs: object, request: StepsRequest) -> StepsObservation:
    """``obs`` if it has one entry per step (and per rank for outputs); else ``MalformedObservation``.

    NOTE: the partition checks zip steps and ranks: a short list would compare fewer of them and
    pass, so the lengths are held here; the tensors themselves are compared (and their shapes
    reported) by the checks.
    """
    if not isinstance(obs, StepsObservation):
        raise MalformedObservation(f"steps: expected moeconf.backends.StepsObservation, got {describe(obs)}")
    steps, ranks = len(request.batches), request.world_size
    for name in ("outputs", "grads", "missing_grads", "params_after"):
        value = getattr(obs, name)
        if not isinstance(value, list | tuple) or len(value) != steps:
            raise MalformedObservation(f"steps.{name}: expected one entry per step ({steps}), got {describe(value)}")
    for s, outputs in enumerate(obs.outputs):
        if not isinstance(outputs, list | tuple) or len(outputs) != ranks:
            raise MalformedObservation(
                f"steps.outputs[{s}]: expected one output per rank ({ranks}), got {describe(outputs)}"
            )
    for s, (grads, params) in enumerate(zip(obs.grads, obs.params_after)):
        for name, value in (("grads", grads), ("params_after", params)):
            if not isinstance(value, Mapping):
                raise MalformedObservation(f"steps.{name}[{s}]: expected a dict, got {describe(value)}")
        _missing_grads(obs.missing_grads[s])
    return obs
