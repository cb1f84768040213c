"""Configuration audit: is a registry entry's *training configuration* right, on a tiny full model?

Two checks per entry, both on ``getattr(transformers, entry.model_class)(tiny config)``:

* ``config_leaf`` — the declared ZeRO-3 leaf classes exist in the modeling module, and
  ``deepspeed.utils.set_z3_leaf_modules`` marks at least one module of each (a typo'd key silently
  registers nothing and ZeRO-3 hangs: LLaMA-Factory #6669, docs/regression-cases.md #3). Leaves are matched by class
  *name* against the model's own classes, so a same-named class from another module (remote code)
  is marked too (LLaMA-Factory #7800, docs/regression-cases.md #4): shown on every entry with an impostor class.
* ``config_aux_loss`` — with the aux coefficient set to a known value where the entry says it lives
  and ``output_router_logits`` enabled as the config allows, ``loss == CE + coef·aux`` on a padded
  batch with labels (docs/regression-cases.md #7: the coefficient is silently ignored). Entries without an aux loss
  whose config still carries a coefficient or the flag get a warning (the knob does nothing).

``main_audit`` renders the results as ``moeconf.harness.engine.CheckResult`` records (backend ``config``).
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from moeconf.hf.block import build_config
from moeconf.registry.config_space import read_field
from moeconf.registry.entry import ArchEntry

AuditStatus = Literal["pass", "fail", "warn", "skip"]

KNOWN_COEF = 0.37
"""Aux coefficient the audit sets: unlike any default (0.001 / 0.01 / 0.02), so ignoring it shows."""

AUX_FLAG = "output_router_logits"
COEF_FIELDS = ("router_aux_loss_coef", "aux_loss_coef")
LOSS_TOL = 1e-5
"""Relative tolerance of ``loss == CE + coef·aux`` (float32 model, float32 recomputation)."""


@dataclass(frozen=True)
class AuditResult:
    """One audit verdict.

    Attributes:
        check: ``"config_leaf"`` or ``"config_aux_loss"``.
        status: ``pass | fail | warn | skip``.
        message: what was found (the failing quantity, or why skipped).
        repro: a command that reruns this audit.
        max_abs_err: ``|loss − (CE + coef·aux)|`` for the aux check.
    """

    check: str
    status: AuditStatus
    message: str
    repro: str
    max_abs_err: float | None = None


def repro_command(entry: ArchEntry) -> str:
    return f"moeconf check --arch {entry.model_type} --check config"


# --- tiny model -----------------------------------------------------------------------------------


def build_model(entry: ArchEntry, config: Any | None = None, device: str | None = None) -> nn.Module:
    """The entry's tiny full model (``entry.model_class``), seeded; on ``device`` (``"meta"``: no memory)."""
    import transformers

    model_cls = getattr(transformers, entry.model_class)
    config = build_config(entry) if config is None else config
    torch.manual_seed(0)
    if device is not None:
        with torch.device(device):
            return model_cls(config)
    return model_cls(config)


# --- config_leaf ------------------------------------------------------------------------------------


def leaf_classes_by_name(model: nn.Module, names: Iterable[str]) -> list[type[nn.Module]]:
    """The model's own module classes whose ``__name__`` is one of ``names`` (first-seen order).

    NOTE: matching by name, not by the class object imported from transformers, is what makes leaf
    registration work for remote-code models whose classes are same-named copies (regression #4).
    """
    wanted = set(names)
    found: dict[type[nn.Module], None] = {}
    for module in model.modules():
        if type(module).__name__ in wanted:
            found.setdefault(type(module), None)
    return list(found)


def _unmark(model: nn.Module) -> None:
    for module in model.modules():
        if getattr(module, "_z3_leaf", False):
            setattr(module, "_z3_leaf", False)  # noqa: B010 (deepspeed's flag, not a declared attribute)


def impostor_class(cls: type[nn.Module], module_name: str = "remote_code.modeling_impostor") -> type[nn.Module]:
    """A same-named copy of ``cls`` defined in another module and *not* a subclass of it — what a
    ``trust_remote_code`` model builds instead of the transformers class."""
    body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    body.update(__module__=module_name, __qualname__=cls.__qualname__)
    return type(cls.__name__, cls.__bases__, body)


def audit_leaf(entry: ArchEntry) -> AuditResult:
    """ZeRO-3 leaf registration by name marks ≥ 1 module per declared class, impostors included."""
    repro = repro_command(entry)
    try:
        from deepspeed.utils import set_z3_leaf_modules, z3_leaf_module
    except Exception as exc:  # ImportError, or deepspeed failing to initialise its accelerator
        return AuditResult("config_leaf", "skip", f"deepspeed not importable: {type(exc).__name__}: {exc}", repro)
    names = entry.zero3_leaves
    modeling = importlib.import_module(entry.modeling_module)
    undefined = [n for n in names if not isinstance(getattr(modeling, n, None), type)]
    if undefined:
        return AuditResult(
            "config_leaf",
            "fail",
            f"leaf class(es) {', '.join(undefined)} not defined in {entry.modeling_module}: "
            "set_z3_leaf_modules would register nothing and ZeRO-3 would hang (typo'd key?)",
            repro,
        )
    model = build_model(entry, device="meta")  # leaf flags need no weights
    classes = leaf_classes_by_name(model, names)
    absent = [n for n in names if n not in {c.__name__ for c in classes}]
    if absent:
        return AuditResult(
            "config_leaf", "fail", f"no module of class {', '.join(absent)} in a tiny {entry.model_class}", repro
        )
    marked = set_z3_leaf_modules(model, classes)
    per_class = {c.__name__: sum(isinstance(m, c) for m in marked) for c in classes}
    if not marked or not all(per_class.values()):
        return AuditResult("config_leaf", "fail", f"set_z3_leaf_modules marked {per_class}", repro)

    # Regression #4: a same-named class from elsewhere is matched by name, not by the imported class.
    target = next(m for m in model.modules() if z3_leaf_module(m))
    original = type(target)
    _unmark(model)
    target.__class__ = impostor_class(original)
    try:
        by_object = set_z3_leaf_modules(model, [original], raise_if_not_found=False)
        missed_by_object = not any(m is target for m in by_object)
        _unmark(model)
        set_z3_leaf_modules(model, leaf_classes_by_name(model, names))
        caught_by_name = z3_leaf_module(target)
    finally:
        target.__class__ = original
    if not caught_by_name:
        return AuditResult(
            "config_leaf",
            "fail",
            f"a same-named {original.__name__} from another module was not marked by name matching",
            repro,
        )
    counts = ", ".join(f"{n}×{c}" for n, c in per_class.items())
    note = " (the imported class object alone would have missed it)" if missed_by_object else ""
    return AuditResult(
        "config_leaf",
        "pass",
        f"set_z3_leaf_modules marked {counts}; a same-named class from another module is matched by name{note}",
        repro,
    )


# --- config_aux_loss ----------------------------------------------------------------------------------


def config_tree(config: Any, depth: int = 0) -> list[tuple[str, Any]]:
    """``(path, config)`` for the config and its (nested) sub-configs."""
    out = [("", config)]
    if depth < 2:
        for key in getattr(type(config), "sub_configs", None) or {}:
            sub = getattr(config, key, None)
            if sub is not None and not isinstance(sub, dict):
                out += [(f"{key}.{p}" if p else key, c) for p, c in config_tree(sub, depth + 1)]
    return out


def get_path(config: Any, path: str) -> Any:
    """``config.<path>``, dotted through sub-configs or dict sub-configs (the registry's own reader)."""
    return read_field(config, path)


def _set_path(config: Any, path: str, value: Any) -> None:
    """Set a dotted attribute (sub-config objects or plain dict sub-configs)."""
    owner_path, _, leaf = path.rpartition(".")
    owner = get_path(config, owner_path) if owner_path else config
    if isinstance(owner, dict):
        owner[leaf] = value
    else:
        setattr(owner, leaf, value)


def enable_router_logits(config: Any) -> list[str]:
    """Set ``output_router_logits=True`` on every (sub-)config that declares it; the paths set."""
    paths = []
    for path, sub in config_tree(config):
        if hasattr(sub, AUX_FLAG):
            setattr(sub, AUX_FLAG, True)
            paths.append(f"{path}.{AUX_FLAG}" if path else AUX_FLAG)
    return paths


def text_vocab(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "vocab_size", None) or config.vocab_size)


def padded_batch(vocab: int, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask``/``labels`` ``[B, S]``; row 0 left-padded, pads labelled -100."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, : seq // 2] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def causal_lm_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy as transformers' causal-LM loss computes it (mean over labelled)."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def loss_parts(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(loss, CE recomputed from the logits, aux_loss)`` of ``model`` (in eval mode) on ``batch``."""
    model.eval()
    with torch.no_grad():
        out = model(**batch, use_cache=False)  # no cache: hybrid linear-attention caches reject a loss-only call
    aux = getattr(out, "aux_loss", None)
    return (
        out.loss.float(),
        causal_lm_ce(out.logits, batch["labels"]),
        None if aux is None else torch.as_tensor(aux).float(),
    )


def _run_with_labels(entry: ArchEntry, config: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(loss, CE recomputed from the logits, aux_loss)`` of the tiny model on a padded batch."""
    return loss_parts(build_model(entry, config), padded_batch(text_vocab(config)))


def audit_aux_loss(entry: ArchEntry) -> AuditResult:
    """``loss == CE + coef·aux`` with the coefficient where the entry says; warn on ignored knobs."""
    repro = repro_command(entry)
    config = build_config(entry)
    if entry.aux_coef_attr is None:
        return _audit_no_aux(entry, config, repro)
    attr = entry.aux_coef_attr
    try:
        _set_path(config, attr, KNOWN_COEF)
        assert float(get_path(config, attr)) == KNOWN_COEF
    except Exception as exc:
        return AuditResult(
            "config_aux_loss", "fail", f"cannot set the aux coefficient {attr}: {type(exc).__name__}: {exc}", repro
        )
    flags = enable_router_logits(config)
    try:
        loss, ce, aux = _run_with_labels(entry, config)
    except Exception as exc:
        return AuditResult(
            "config_aux_loss",
            "fail",
            f"a tiny {entry.model_class} with labels raised {brief_error(exc)}: the aux-loss composition cannot be verified",
            repro,
        )
    if aux is None:
        return AuditResult(
            "config_aux_loss",
            "fail",
            f"{attr}={KNOWN_COEF}, {', '.join(flags) or 'no output_router_logits'}: the model reports no "
            "aux_loss, so the coefficient is silently ignored",
            repro,
        )
    if not torch.isfinite(aux) or float(aux) <= 0:
        return AuditResult(
            "config_aux_loss", "fail", f"aux_loss is {float(aux):.6g}: a load-balancing loss is > 0", repro
        )
    expected = ce + KNOWN_COEF * aux
    err = float((loss - expected).abs())
    if err > LOSS_TOL * max(1.0, float(expected.abs())):
        implied = float((loss - ce) / aux)
        return AuditResult(
            "config_aux_loss",
            "fail",
            f"loss {float(loss):.6g} != CE {float(ce):.6g} + {KNOWN_COEF}·aux {float(aux):.6g} = {float(expected):.6g}: "
            f"the model used coefficient {implied:.4g}, not {attr}={KNOWN_COEF} (set but ignored)",
            repro,
            err,
        )
    return AuditResult(
        "config_aux_loss",
        "pass",
        f"loss == CE + {attr}·aux ({float(loss):.6g} = {float(ce):.6g} + {KNOWN_COEF}·{float(aux):.6g}) "
        "on a left-padded batch",
        repro,
        err,
    )


def brief_error(exc: BaseException, limit: int = 120) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:limit]}"


def _audit_no_aux(entry: ArchEntry, config: Any, repro: str) -> AuditResult:
    """No aux loss declared: flag a coefficient/flag the config carries but the model never uses."""
    knobs = [
        f"{p}.{f}" if p else f for p, sub in config_tree(config) for f in COEF_FIELDS + (AUX_FLAG,) if hasattr(sub, f)
    ]
    if not knobs:
        return AuditResult("config_aux_loss", "pass", "no aux loss, and the config offers no coefficient", repro)
    for path, sub in config_tree(config):
        for name in COEF_FIELDS:
            if hasattr(sub, name):
                setattr(sub, name, KNOWN_COEF)
    enable_router_logits(config)
    note = ""
    try:
        loss, ce, aux = _run_with_labels(entry, config)
    except Exception as exc:  # e.g. Llama4ForConditionalGeneration.forward reads outputs.image_outputs, which is absent
        note = f" (not confirmed: a tiny {entry.model_class} with labels raised {brief_error(exc)})"
    else:
        err = float((loss - ce).abs())
        if aux is not None and err > LOSS_TOL * max(1.0, float(ce.abs())):
            return AuditResult(
                "config_aux_loss",
                "fail",
                f"the model adds an aux loss (loss − CE = {err:.4g}) but the entry declares no aux_coef_attr",
                repro,
                err,
            )
    return AuditResult(
        "config_aux_loss",
        "warn",
        f"coefficient set but the model computes no aux loss: it would be silently ignored "
        f"(config carries {', '.join(knobs)}){note}",
        repro,
    )


# --- entry points -------------------------------------------------------------------------------------

AUDITS = {"config_leaf": audit_leaf, "config_aux_loss": audit_aux_loss}


def audit_entry(entry: ArchEntry) -> list[AuditResult]:
    """Every audit of one entry; an audit that raises is reported as a failure naming the exception."""
    results = []
    for check, audit in AUDITS.items():
        try:
            results.append(audit(entry))
        except Exception as exc:
            results.append(
                AuditResult(check, "fail", f"audit raised {type(exc).__name__}: {exc}", repro_command(entry))
            )
    return results


def to_check_results(entry: ArchEntry, results: Sequence[AuditResult]) -> list[Any]:
    """``moeconf.harness.engine.CheckResult`` records (warn → pass, message prefixed ``WARNING:``)."""
    from moeconf.harness.engine import CheckResult
    from moeconf.harness.status import declared_verdict

    records = []
    for r in results:
        message = f"WARNING: {r.message}" if r.status == "warn" else r.message
        declared = entry.expectation(r.check, "config", "fp32", "cpu")
        passed = None if r.status == "skip" else r.status != "fail"
        status, prefix = declared_verdict(
            passed, declared.status if declared else None, declared.reason if declared else ""
        )
        if prefix:
            message = f"{prefix} {message}"
        records.append(
            CheckResult(
                arch=entry.model_type,
                backend="config",
                dtype="fp32",
                device="cpu",
                case="tiny-model",
                check=r.check,
                status=status,
                max_abs_err=r.max_abs_err,
                max_rel_err=None,  # type: ignore[arg-type]
                atol=LOSS_TOL if r.check == "config_aux_loss" and r.max_abs_err is not None else None,
                rtol=None,
                message=message,
                repro=r.repro,
            )
        )
    return records


def main_audit(archs: list[str], fmt: str) -> int:
    """Audit ``archs`` and print the report (``text|json|junit``); 0 all passed, 1 a failure."""
    from moeconf.harness.report import FAILING, RENDERERS
    from moeconf.registry import get_entry

    start = time.perf_counter()
    records = []
    for arch in archs:
        entry = get_entry(arch)
        records += to_check_results(entry, audit_entry(entry))
    sys.stdout.write(RENDERERS[fmt](records, time.perf_counter() - start))
    return 1 if not records or any(r.status in FAILING for r in records) else 0


__all__ = [
    "AuditResult",
    "audit_aux_loss",
    "audit_entry",
    "audit_leaf",
    "brief_error",
    "build_model",
    "causal_lm_ce",
    "config_tree",
    "enable_router_logits",
    "get_path",
    "impostor_class",
    "leaf_classes_by_name",
    "loss_parts",
    "main_audit",
    "padded_batch",
    "text_vocab",
    "to_check_results",
]
