"""Observation validation: what a backend returned is checked for form before any check reads it.

A malformed observation (wrong type, shape, dtype, an index out of range) is the backend adapter's
fault, not a numerical disagreement of the MoE code: it becomes one ``error`` record naming the field,
the expected form and what came back, and never crashes the run. Non-finite *values* are not a form
problem: they are the code under test computing garbage, so the checks report them as ``fail``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from moeconf.backends.base import Observation, RunRequest
from moeconf.params import NOT_TRAINED, param_shapes


class MalformedObservation(ValueError):
    """The observation does not have the documented form; the message names the field."""


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise MalformedObservation(f"{name}: expected a torch.Tensor, got {_describe(value)}")
    return value


def _shape(name: str, value: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(value.shape) != shape:
        raise MalformedObservation(f"{name}: expected shape {list(shape)}, got {_describe(value)}")


def _floating(name: str, value: torch.Tensor) -> None:
    if not value.is_floating_point():
        raise MalformedObservation(f"{name}: expected a floating-point tensor, got {_describe(value)}")


def _scalar(name: str, value: object) -> None:
    if value is None:
        return
    tensor = _tensor(name, value)
    _floating(name, tensor)
    if tensor.numel() != 1:
        raise MalformedObservation(f"{name}: expected a scalar (one element), got {_describe(tensor)}")


def _routing(obs: Observation, tokens: int, top_k: int, width: int) -> None:
    if obs.topk_index is not None:
        index = _tensor("topk_index", obs.topk_index)
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise MalformedObservation(f"topk_index: expected an integer tensor, got {_describe(index)}")
        _shape("topk_index", index, (tokens, top_k))
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= width):
            raise MalformedObservation(
                f"topk_index: expert ids must lie in [0, {width}), got [{int(index.min())}, {int(index.max())}]"
            )
    if obs.topk_weights is not None:
        weights = _tensor("topk_weights", obs.topk_weights)
        _floating("topk_weights", weights)
        _shape("topk_weights", weights, (tokens, top_k))
    if obs.router_logits is not None:
        logits = _tensor("router_logits", obs.router_logits)
        _floating("router_logits", logits)
        if logits.dim() != 2 or logits.shape[0] != tokens:
            raise MalformedObservation(f"router_logits: expected shape [{tokens}, E], got {_describe(logits)}")


def _grads(grads: object, expected: Mapping[str, tuple[int, ...]]) -> None:
    if not isinstance(grads, Mapping):
        raise MalformedObservation(f"grads: expected a dict of canonical name -> tensor, got {_describe(grads)}")
    for name, grad in grads.items():
        if grad is None:
            continue
        if name not in expected:
            raise MalformedObservation(f"grads: unknown parameter {name!r} (canonical names: {', '.join(expected)})")
        tensor = _tensor(f"grads[{name!r}]", grad)
        _floating(f"grads[{name!r}]", tensor)
        _shape(f"grads[{name!r}]", tensor, expected[name])


def validate_observation(obs: object, request: RunRequest) -> Observation:
    """``obs`` if it has the documented form for ``request``; else ``MalformedObservation``."""
    if not isinstance(obs, Observation):
        raise MalformedObservation(f"run() returned {_describe(obs)}, expected moeconf.backends.Observation")
    spec = request.entry.spec
    hidden_shape = tuple(request.hidden.shape)
    tokens = request.hidden.shape[0] * request.hidden.shape[1]
    output = _tensor("output", obs.output)
    _shape("output", output, hidden_shape)
    if output.dtype != request.dtype:
        # NOTE: a backend computing in float64 when asked for bf16 would pass every bf16 tolerance
        # without testing the bf16 arithmetic at all.
        wanted = str(request.dtype).removeprefix("torch.")
        raise MalformedObservation(f"output: expected the requested compute dtype {wanted}, got {_describe(output)}")
    _routing(obs, tokens, spec.top_k, spec.router_width)
    _scalar("aux_loss", obs.aux_loss)
    _scalar("z_loss", obs.z_loss)
    expected = {n: s for n, s in param_shapes(spec).items() if n not in NOT_TRAINED}
    expected["input"] = hidden_shape
    _grads(obs.grads, expected)
    if not isinstance(obs.missing_grads, tuple | list) or not all(isinstance(m, str) for m in obs.missing_grads):
        raise MalformedObservation(f"missing_grads: expected a tuple of str, got {_describe(obs.missing_grads)}")
    return obs
