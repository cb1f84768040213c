"""``AuditResult``: one verdict on a framework's function, and its rendering as moeconf records."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from moeconf.harness.engine import CheckResult
from moeconf.harness.report import RENDERERS, exit_status
from moeconf.tools.audit import LOSS_TOL

IntegrationStatus = Literal["pass", "fail", "warn", "skip", "setup"]

BACKEND_PREFIX = "integration"


@dataclass(frozen=True)
class AuditResult:
    """One verdict of an integration audit on one architecture.

    Attributes:
        arch: the registry model type the function was run on.
        check: ``leaf_marks | leaf_is_block | leaf_ranks_agree | configure_router_logits | configure_aux_coef``.
        status: ``pass | fail | warn | skip | setup`` (``setup``: the machine lacks what the audit
            needs, e.g. DeepSpeed; never green).
        message: what was found, expected vs actual in words.
        function: ``module:qualname`` of the framework function audited.
        repro: a command that reruns this audit ("" when the function is not importable by name).
        expected: what a correct function produces (e.g. ``("MixtralSparseMoeBlock@model.layers.0.mlp",)``).
        actual: what this one produced (e.g. the marked ``Class@path`` on rank 0).
        max_abs_err: ``|loss − (CE + coef·aux)|`` for ``configure_aux_coef``.
    """

    arch: str
    check: str
    status: IntegrationStatus
    message: str
    function: str = ""
    repro: str = ""
    expected: tuple[str, ...] = ()
    actual: tuple[str, ...] = ()
    max_abs_err: float | None = None

    @property
    def ok(self) -> bool:
        """True unless the result blames the function (fail) or could not judge it (setup)."""
        return self.status not in ("fail", "setup")

    def to_check_result(self) -> CheckResult:
        """The record moeconf's text/JSON/JUnit reports render (``warn`` → pass, ``WARNING:`` prefix).

        The record's backend is ``integration:<module:qualname>`` of the audited function, its case
        ``tiny-model``.
        """
        message = f"WARNING: {self.message}" if self.status == "warn" else self.message
        if self.expected or self.actual:
            message += f"\nexpected: {', '.join(self.expected) or '-'}\nactual: {', '.join(self.actual) or '-'}"
        status = "pass" if self.status == "warn" else self.status
        return CheckResult(
            arch=self.arch,
            backend=f"{BACKEND_PREFIX}:{self.function}" if self.function else BACKEND_PREFIX,
            dtype="fp32",
            device="cpu",
            case="tiny-model",
            check=self.check,
            status=status,
            max_abs_err=self.max_abs_err,
            max_rel_err=None,
            atol=LOSS_TOL if self.max_abs_err is not None else None,
            rtol=None,
            message=message,
            repro=self.repro,
        )


def to_check_results(results: Sequence[AuditResult]) -> list[CheckResult]:
    """``moeconf.harness.engine.CheckResult`` records, one per result, in order."""
    return [r.to_check_result() for r in results]


def render(results: Sequence[AuditResult], fmt: Literal["text", "json", "junit"] = "text") -> str:
    """The report moeconf prints for ``moeconf check``, in ``fmt``."""
    return RENDERERS[fmt](to_check_results(results))


def report_exit_code(results: Sequence[AuditResult]) -> int:
    """``moeconf check``'s exit rule: 1 a failure, 2 not judged (setup, or everything skipped), else 0."""
    return exit_status(to_check_results(results))


def function_ref(fn: Callable[..., Any]) -> str:
    """``module:qualname`` of ``fn`` (a functools.partial names its inner function)."""
    inner = getattr(fn, "func", fn)
    module = getattr(inner, "__module__", None) or "?"
    name = getattr(inner, "__qualname__", None) or type(inner).__qualname__
    return f"{module}:{name}"


def repro_command(kind: str, fn: Callable[..., Any], arch: str, extra: Sequence[str] = ()) -> str:
    """``python -m moeconf.integration KIND module:attr --arch A``, when the function is importable
    by that name (module level, not a lambda, closure or partial); else "" — a command that could not
    find the function would be worse than none."""
    ref = function_ref(fn)
    if resolve(ref) is not fn or ref.startswith("__main__:"):
        return ""
    return shlex.join(["python", "-m", "moeconf.integration", kind, ref, "--arch", arch, *extra])


def resolve(ref: str) -> Any:
    """The object ``module:qualname`` names among the imported modules, or None (imports nothing)."""
    module_name, _, qualname = ref.partition(":")
    value: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        value = getattr(value, part, None)
    return value


__all__ = [
    "AuditResult",
    "IntegrationStatus",
    "function_ref",
    "render",
    "report_exit_code",
    "repro_command",
    "to_check_results",
]
