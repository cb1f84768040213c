"""The one way through: entry → inputs → reference → backend → checks → records.

Both fronts use this: the pytest parity suite (one test per arch × backend × dtype × device) and
``moeconf check``. Neither is a second runner of the other.
"""

from __future__ import annotations

import dataclasses
import shlex
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

from moeconf.backends import Backend, Observation, RunRequest, resolve_backend
from moeconf.cases import CASES, Case, CaseError, make_inputs
from moeconf.checks import CHECKS, CheckInput, Outcome, applicable_checks
from moeconf.devices import DTYPES
from moeconf.partition.checks import PARTITION_CHECKS, STEPS_CASE, steps_outcomes
from moeconf.partition.steps import StepsObservation, StepsReference, make_steps
from moeconf.reference import reference_forward, reference_gradients
from moeconf.registry import ArchEntry, get_entry
from moeconf.registry.entry import Status


@dataclass(frozen=True)
class CheckResult:
    """One record of a report (the JSON schema's ``results[]``)."""

    arch: str
    backend: str
    dtype: str
    device: str
    case: str
    check: str
    status: Status
    max_abs_err: float | None
    max_rel_err: float | None
    atol: float | None
    rtol: float | None
    message: str
    repro: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Selection:
    """What to run; every field is a CLI option of ``moeconf check``."""

    archs: tuple[str, ...]
    backends: tuple[str, ...] = ("hf-eager",)
    dtypes: tuple[str, ...] = ("fp32",)
    device: str = "cpu"
    cases: tuple[str, ...] = tuple(c.name for c in CASES) + (STEPS_CASE,)
    checks: tuple[str, ...] = tuple(CHECKS) + PARTITION_CHECKS
    seed: int = 0
    program: str = field(default="moeconf", compare=False)


def repro_command(sel: Selection, arch: str, backend: str, dtype: str, case: str, check: str) -> str:
    """A command line that reruns exactly one record."""
    args = [
        *shlex.split(sel.program),
        "check",
        "--arch",
        arch,
        "--backend",
        backend,
        "--dtype",
        dtype,
        "--device",
        sel.device,
        "--case",
        case,
        "--check",
        check,
        "--seed",
        str(sel.seed),
    ]
    return shlex.join(args)


def _status(outcome: Outcome, expectation_status: str | None) -> Status:
    if outcome.passed is None:
        return "skip"
    if expectation_status == "xfail":
        return "xfail" if not outcome.passed else "fail"  # strict: an unexpected pass is a stale declaration
    return "pass" if outcome.passed else "fail"


def _records(
    sel: Selection,
    entry: ArchEntry,
    backend_name: str,
    dtype: str,
    case: Case,
    checks: Iterable[str],
    outcome_of: Callable[[str], Outcome],
) -> list[CheckResult]:
    records = []
    for check in checks:
        expectation = entry.expectation(check, backend_name, dtype, sel.device)
        if expectation is not None and expectation.status == "skip":
            outcome, status = Outcome(None, message=f"declared skip: {expectation.reason}"), "skip"
        else:
            outcome = outcome_of(check)
            status = _status(outcome, expectation.status if expectation else None)
            if expectation is not None:
                verdict = "failed as declared" if status == "xfail" else "passed, but is declared xfail"
                outcome = Outcome(
                    outcome.passed,
                    outcome.max_abs_err,
                    outcome.max_rel_err,
                    outcome.tol,
                    f"{verdict}: {expectation.reason}. {outcome.message}".strip(),
                )
        tol = outcome.tol
        records.append(
            CheckResult(
                arch=entry.model_type,
                backend=backend_name,
                dtype=dtype,
                device=sel.device,
                case=case.name,
                check=check,
                status=status,
                max_abs_err=outcome.max_abs_err,
                max_rel_err=outcome.max_rel_err,
                atol=tol.atol if tol else None,
                rtol=tol.rtol if tol else None,
                message=outcome.message,
                repro=repro_command(sel, entry.model_type, backend_name, dtype, case.name, check),
            )
        )
    return records


def _one_line(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    where = f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _failure(exc: BaseException) -> Outcome:
    """A backend that raised: a hang or a dead rank is a failed check; anything else an error."""
    return Outcome(False if getattr(exc, "status", "error") == "fail" else None, message=_one_line(exc))


def _raised_records(
    sel: Selection,
    entry: ArchEntry,
    name: str,
    dtype: str,
    case: Case,
    checks: list[str],
    exc: BaseException,
    detail: str | None = None,
) -> list[CheckResult]:
    """Records of a backend that raised: ``error`` if it broke, ``fail`` for a hang or a dead rank
    (``detail``, the full report with every rank's stack, goes on the ``no_hang`` record)."""
    outcome = _failure(exc)
    if outcome.passed is None:
        return [
            dataclasses.replace(r, status="error", message=f"backend raised {outcome.message}")
            for r in _records(sel, entry, name, dtype, case, checks, lambda _c: Outcome(None))
        ]
    full = Outcome(False, message=detail) if detail else outcome
    return _records(sel, entry, name, dtype, case, checks, lambda c: full if c == "no_hang" else outcome)


def _as_records(
    sel: Selection,
    entry: ArchEntry,
    name: str,
    dtype: str,
    case: Case,
    checks: list[str],
    result: Observation | BaseException,
    check_input: Callable[[Observation], CheckInput],
) -> list[CheckResult]:
    if isinstance(result, BaseException):
        return _raised_records(sel, entry, name, dtype, case, checks, result)
    ci = check_input(result)
    return _records(sel, entry, name, dtype, case, checks, lambda c: CHECKS[c](ci))


def _steps_records(
    sel: Selection,
    entry: ArchEntry,
    name: str,
    dtype: str,
    steps_ref: StepsReference | None,
    result: StepsObservation | BaseException | None,
) -> list[CheckResult]:
    checks = [c for c in PARTITION_CHECKS if c in sel.checks]
    case = Case(STEPS_CASE, 1, 1, "none", "adversarial multi-step routing")
    if isinstance(result, BaseException):
        return _raised_records(sel, entry, name, dtype, case, checks, result, detail=str(result))
    assert result is not None and steps_ref is not None
    outcomes = steps_outcomes(steps_ref, result, dtype)
    return _records(sel, entry, name, dtype, case, checks, lambda c: outcomes[c])


def _session_records(
    sel: Selection,
    entry: ArchEntry,
    name: str,
    backend: Backend,
    dtype: str,
    checks: list[str],
    prepared: list[tuple[Case, RunRequest]],
    check_input: Callable[[Case], Callable[[Observation], CheckInput]],
) -> Iterator[list[CheckResult]]:
    """A multi-rank backend: every case plus the adversarial steps in one launch (``run_session``)."""
    want_steps = STEPS_CASE in sel.cases and any(c in sel.checks for c in PARTITION_CHECKS)
    steps_ref = None
    try:
        steps_request = None
        if want_steps:
            steps_request, steps_ref = make_steps(entry, DTYPES[dtype], sel.device, seed=sel.seed)
        observations, steps_obs = backend.run_session([req for _, req in prepared], steps_request)  # type: ignore[attr-defined]
        results: list[Observation | BaseException] = list(observations)
        steps_result: StepsObservation | BaseException | None = steps_obs
    except Exception as exc:  # a hang, a crash or unusable inputs fail every case of the launch
        results, steps_result = [exc] * len(prepared), exc
    for (case, _), result in zip(prepared, results):
        yield _as_records(sel, entry, name, dtype, case, checks, result, check_input(case))
    if want_steps:
        yield _steps_records(sel, entry, name, dtype, steps_ref, steps_result)


def run_arch(sel: Selection, entry: ArchEntry, backends: dict[str, Backend], dtype: str) -> Iterator[list[CheckResult]]:
    """Records of one (arch, dtype) for every backend and case; references are computed once.

    Multi-rank backends (``run_session``) get every case plus the adversarial steps in one launch.
    """
    checks = [c for c in applicable_checks(entry.spec) if c in sel.checks]
    torch_dtype = DTYPES[dtype]
    cases = [c for c in CASES if c.name in sel.cases]
    prepared: list[tuple[Case, RunRequest]] = []
    references = {}
    for case in cases:
        try:
            inputs = make_inputs(entry.spec, case, torch_dtype, sel.seed)
        except CaseError as exc:
            for name in backends:
                yield _records(
                    sel, entry, name, dtype, case, checks, lambda _c, e=exc: Outcome(False, message=f"inputs: {e}")
                )
            continue
        reference = reference_forward(entry.spec, inputs.params, inputs.hidden, inputs.attention_mask)
        ref_grads = reference_gradients(entry.spec, inputs.params, inputs.hidden, inputs.grad_output)
        request = RunRequest(
            entry, inputs.params, inputs.hidden, inputs.attention_mask, inputs.grad_output, torch_dtype, sel.device
        )
        prepared.append((case, request))
        references[case.name] = (reference, ref_grads)

    def check_input(case: Case) -> Callable[[Observation], CheckInput]:
        reference, ref_grads = references[case.name]
        return lambda obs: CheckInput(entry.spec, reference, ref_grads, obs, dtype)

    for name, backend in backends.items():
        reason = (
            backend.supports(entry, dtype, sel.device) if dtype in backend.dtypes else f"{name} does not run {dtype}"
        )
        if reason is not None:
            for case, _ in prepared:
                yield _records(sel, entry, name, dtype, case, checks, lambda _c, r=reason: Outcome(None, message=r))
            continue
        if getattr(backend, "run_session", None) is not None:
            yield from _session_records(sel, entry, name, backend, dtype, checks, prepared, check_input)
            continue
        for case, request in prepared:
            try:
                result: Observation | BaseException = backend.run(request)
            except Exception as exc:  # the backend broke: report it, keep gating the rest
                result = exc
            yield _as_records(sel, entry, name, dtype, case, checks, result, check_input(case))


def run_selection(sel: Selection) -> Iterator[list[CheckResult]]:
    """Every record of the selection, a (arch, backend, dtype, case) group at a time (for progress)."""
    backends = {name: resolve_backend(name) for name in sel.backends}
    for arch in sel.archs:
        entry = get_entry(arch)
        for dtype in sel.dtypes:
            yield from run_arch(sel, entry, backends, dtype)
