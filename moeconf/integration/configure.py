"""``audit_configure_function``: does a framework's MoE config function really turn the aux loss on,
with the coefficient it was given?

A configure function (LLaMA-Factory's ``configure_moe(config, model_args, is_trainable)``, or any
``f(config)``) edits a model config before the model is built. Two checks per architecture, on a tiny
model built from the configured config, run on a left-padded batch with labels:

* ``configure_router_logits`` — where the model has a load-balancing loss, the function switched the
  router outputs on (``output_router_logits``): without them the model reports no ``aux_loss`` and
  never adds one (the experts collapse silently).
* ``configure_aux_coef`` — ``loss == CE + coef·aux`` with the coefficient the function was given: a
  coefficient written to an attribute the model never reads is silently ignored
  (docs/regression-cases.md #7).

The config starts from the config class's defaults for every aux knob (``default_config``), so
nothing the registry's tiny config pre-sets can pass for the function's work.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Any

from moeconf.integration.environment import preserved_rng
from moeconf.integration.leaf import ResultFactory
from moeconf.integration.models import default_config, padded_batch, tiny_model
from moeconf.integration.results import AuditResult, function_ref, repro_command
from moeconf.registry import REGISTRY, ArchEntry, get_entry
from moeconf.tools.audit import (
    AUX_FLAG,
    COEF_FIELDS,
    KNOWN_COEF,
    LOSS_TOL,
    brief_error,
    config_tree,
    get_path,
    loss_parts,
)

ConfigureFunction = Callable[..., Any]
"""``f(config)``, ``f(config, model_args)`` or ``f(config, model_args, is_trainable)``; edits the
config in place or returns the configured config."""

CONFIGURE_CHECKS = ("configure_router_logits", "configure_aux_coef")


@dataclass(frozen=True)
class CallPlan:
    """How to call a configure function: how many of ``(config, model_args, True)`` positionally,
    and which of ``model_args`` / ``is_trainable`` by keyword."""

    positional: int
    keywords: tuple[str, ...] = ()

    def call(self, fn: ConfigureFunction, config: Any, model_args: Any) -> Any:
        """Call ``fn``; the configured config (its return value when that is a config, else ``config``)."""
        values = {"config": config, "model_args": model_args, "is_trainable": True}
        args = list(values.values())[: self.positional]
        returned = fn(*args, **{k: values[k] for k in self.keywords})
        return returned if _is_config(returned) else config


def _is_config(value: Any) -> bool:
    from transformers import PretrainedConfig

    return isinstance(value, PretrainedConfig)


def call_plan(fn: ConfigureFunction) -> CallPlan:
    """The ``CallPlan`` for ``fn``'s signature; ``TypeError`` when it asks for something else.

    Positional parameters get ``config``, ``model_args``, ``is_trainable=True`` in that order (as many
    as it has, at most three); required keyword-only ``model_args`` / ``is_trainable`` get theirs by
    name. An uninspectable callable gets ``(config, model_args)``.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return CallPlan(2)
    positional_kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p for p in params if p.kind in positional_kinds]
    required_extra = [p.name for p in positional[3:] if p.default is inspect.Parameter.empty]
    keywords = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is p.empty]
    unknown = required_extra + [k for k in keywords if k not in ("model_args", "is_trainable")]
    if unknown:
        raise TypeError(
            f"{function_ref(fn)} requires {', '.join(unknown)}: a configure function takes "
            "(config), (config, model_args) or (config, model_args, is_trainable)"
        )
    count = min(len(positional), 3)
    if count == 0 and not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        raise TypeError(f"{function_ref(fn)} takes no config argument")
    return CallPlan(max(count, 1), tuple(keywords))


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Dotted keys whose value differs between two ``config.to_dict()``s (added or removed included)."""
    a, b = _flat(before), _flat(after)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, object()) != b.get(k, object()))


def _flag_paths(config: Any) -> tuple[list[str], list[str]]:
    """Paths of ``output_router_logits`` that are on, and that are off, in the config tree."""
    on: list[str] = []
    off: list[str] = []
    for path, sub in config_tree(config):
        if hasattr(sub, AUX_FLAG):
            (on if getattr(sub, AUX_FLAG) else off).append(f"{path}.{AUX_FLAG}" if path else AUX_FLAG)
    return on, off


def _coef_paths(config: Any, coef: float) -> list[str]:
    """Paths of coefficient fields holding ``coef``."""
    return [
        f"{path}.{name}" if path else name
        for path, sub in config_tree(config)
        for name in COEF_FIELDS
        if isinstance(getattr(sub, name, None), (int, float)) and math.isclose(getattr(sub, name), coef)
    ]


def _audit_entry(
    fn: ConfigureFunction, plan: CallPlan, entry: ArchEntry, required: bool, coef: float, model_args: Any
) -> list[AuditResult]:
    ref = function_ref(fn)
    extra = [] if coef == KNOWN_COEF else ["--coef", repr(coef)]
    result: ResultFactory = partial(
        AuditResult, entry.model_type, function=ref, repro=repro_command("configure", fn, entry.model_type, extra)
    )
    config = default_config(entry)
    if entry.aux_coef_attr and math.isclose(float(get_path(config, entry.aux_coef_attr)), coef):
        raise ValueError(
            f"coef={coef} is {entry.model_type}'s default {entry.aux_coef_attr}: a function that ignores it would pass"
        )
    before = config.to_dict()
    try:
        config = plan.call(fn, config, model_args)
    except Exception as exc:  # noqa: BLE001 (whatever the framework's code raises is its failure, reported)
        return [result(CONFIGURE_CHECKS[0], "fail", f"{ref} raised {brief_error(exc)}")] + [
            result(CONFIGURE_CHECKS[1], "skip", "not judged: the configure function raised")
        ]
    changed = changed_keys(before, config.to_dict())
    if not changed and not required:
        # NOTE: the same words for every architecture, so the text report lists them as one cause.
        why = "leaves the config unchanged: the function does not configure this model type (name it in archs to require it)"
        return [result(c, "skip", why) for c in CONFIGURE_CHECKS]
    try:
        model = tiny_model(entry, config)
        loss, ce, aux = loss_parts(model, padded_batch(model))
    except Exception as exc:  # noqa: BLE001 (a config the model cannot run with is the function's failure...)
        why = f"a tiny {entry.model_class} built from the configured config raised {brief_error(exc)} on a batch with labels"
        if _raises_unconfigured(entry):  # ...unless the model raises without it too (an upstream bug)
            why += "; it raises unconfigured too (the model's own bug): the configuration cannot be judged here"
            return [result(c, "skip", "not judged: " + why) for c in CONFIGURE_CHECKS]
        return [result(CONFIGURE_CHECKS[0], "fail", why), result(CONFIGURE_CHECKS[1], "skip", "not judged: " + why)]
    on, off = _flag_paths(config)
    if entry.aux_coef_attr is None:
        return _no_aux(result, entry, config, coef, float(loss), float(ce), on)
    where = ", ".join([f"{p}=True" for p in on] + [f"{p}=False" for p in off]) or f"no {AUX_FLAG} in the config"
    if aux is None:
        return [
            result(
                "configure_router_logits",
                "fail",
                f"router outputs not switched on ({where}): a tiny {entry.model_class} reports no aux_loss, so the "
                "load-balancing loss is never added to the training loss",
                expected=(f"{AUX_FLAG}=True",),
                actual=tuple(f"{p}=False" for p in off),
            ),
            result("configure_aux_coef", "skip", "not judged: no aux_loss reported (see configure_router_logits)"),
        ]
    router = result("configure_router_logits", "pass", f"{where}; aux_loss = {float(aux):.6g}")
    return [router, _aux_coef(result, entry, config, coef, loss, ce, aux)]


def _raises_unconfigured(entry: ArchEntry) -> bool:
    """Whether the tiny model built from the class-default config raises on a batch with labels.

    NOTE: e.g. ``Llama4ForConditionalGeneration.forward`` reads ``outputs.image_outputs``, which a
    text-only batch never produces (transformers 5.24): no configure function is to blame for that.
    """
    try:
        model = tiny_model(entry, default_config(entry))
        loss_parts(model, padded_batch(model))
    except Exception:  # noqa: BLE001 (any failure means the model cannot run with labels at all)
        return True
    return False


def _aux_coef(
    result: ResultFactory, entry: ArchEntry, config: Any, coef: float, loss: Any, ce: Any, aux: Any
) -> AuditResult:
    if not math.isfinite(float(aux)) or float(aux) <= 0:
        return result("configure_aux_coef", "fail", f"aux_loss is {float(aux):.6g}: a load-balancing loss is > 0")
    expected = ce + coef * aux
    err = float((loss - expected).abs())
    held = get_path(config, entry.aux_coef_attr)  # type: ignore[arg-type]
    if err > LOSS_TOL * max(1.0, float(expected.abs())):
        implied = float((loss - ce) / aux)
        return result(
            "configure_aux_coef",
            "fail",
            f"loss {float(loss):.6g} != CE {float(ce):.6g} + {coef}·aux {float(aux):.6g} = {float(expected):.6g}: the "
            f"model used coefficient {implied:.4g}, not the {coef} the function was given (it reads "
            f"{entry.aux_coef_attr}, which holds {held})",
            expected=(f"{entry.aux_coef_attr}={coef}",),
            actual=(f"{entry.aux_coef_attr}={held}",),
            max_abs_err=err,
        )
    return result(
        "configure_aux_coef",
        "pass",
        f"loss == CE + {coef}·aux ({float(loss):.6g} = {float(ce):.6g} + {coef}·{float(aux):.6g}) on a left-padded batch",
        max_abs_err=err,
    )


def _no_aux(
    result: ResultFactory, entry: ArchEntry, config: Any, coef: float, loss: float, ce: float, on: list[str]
) -> list[AuditResult]:
    """A model without a load-balancing loss: nothing to switch on; flag knobs set for nothing."""
    router = (
        result(
            "configure_router_logits",
            "warn",
            f"switched {', '.join(on)} on, but a tiny {entry.model_class} computes no aux loss: router logits are "
            "returned for nothing",
        )
        if on
        else result(
            "configure_router_logits", "pass", f"{entry.model_class} computes no aux loss: nothing to switch on"
        )
    )
    err = abs(loss - ce)
    if err > LOSS_TOL * max(1.0, abs(ce)):
        aux = result(
            "configure_aux_coef",
            "fail",
            f"loss {loss:.6g} != CE {ce:.6g} for a model the registry declares without an aux loss",
            max_abs_err=err,
        )
    elif set_for_nothing := _coef_paths(config, coef):
        aux = result(
            "configure_aux_coef",
            "warn",
            f"set {', '.join(set_for_nothing)}={coef}, but the model computes no aux loss: the coefficient is "
            "silently ignored",
            max_abs_err=err,
        )
    else:
        aux = result("configure_aux_coef", "pass", f"no aux loss in {entry.model_class}: loss == CE", max_abs_err=err)
    return [router, aux]


def audit_configure_function(
    configure_fn: ConfigureFunction,
    *,
    archs: Iterable[str] | None = None,
    coef: float = KNOWN_COEF,
    model_args: Any | None = None,
) -> list[AuditResult]:
    """Audit a framework's MoE config function on tiny models of registered architectures.

    Args:
        configure_fn: ``f(config)``, ``f(config, model_args)`` or ``f(config, model_args, is_trainable)``
            (``is_trainable=True``), editing the config in place or returning it (see ``call_plan``).
        archs: model types the function must configure. None: every registered type, and one whose
            config it leaves unchanged is skipped ("does not configure").
        coef: the aux-loss coefficient the function is given; unlike any default (0.001/0.01/0.02),
            so ignoring it shows. A value equal to an architecture's default is a ``ValueError``.
        model_args: what the function reads the coefficient from; default
            ``SimpleNamespace(moe_aux_loss_coef=coef)`` (LLaMA-Factory's ``ModelArguments`` field).

    Returns:
        Per architecture, ``configure_router_logits`` and ``configure_aux_coef`` results.
    """
    if not (math.isfinite(coef) and coef > 0):
        raise ValueError(f"coef={coef}: an aux-loss coefficient is finite and > 0")
    if model_args is None:
        model_args = SimpleNamespace(moe_aux_loss_coef=coef)
    elif getattr(model_args, "moe_aux_loss_coef", coef) != coef:
        raise ValueError(f"model_args.moe_aux_loss_coef={model_args.moe_aux_loss_coef} but coef={coef}: pass the same")
    plan = call_plan(configure_fn)
    required = archs is not None
    entries = [get_entry(a) for a in archs] if archs is not None else list(REGISTRY.values())
    with preserved_rng():
        return [r for e in entries for r in _audit_entry(configure_fn, plan, e, required, coef, model_args)]


__all__ = ["CONFIGURE_CHECKS", "CallPlan", "ConfigureFunction", "audit_configure_function", "call_plan", "changed_keys"]
