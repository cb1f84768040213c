"""The one way through: entry → inputs → reference → backend → observation → checks → records.

Both fronts use this: the pytest suites (one test per arch × backend × dtype × device) and
``moeconf check``. Neither is a second runner of the other.

Where blame goes (``moeconf.harness.status``): a disagreement with the reference, non-finite values,
or ranks that hang or die, is ``fail``; a backend that raises (``SystemExit`` included), times out
(``Selection.timeout_s``, with the stack where it was stuck), returns a malformed observation (the
field named, ``moeconf.harness.validate``), or whose ``supports()`` raises or answers outside its
contract, is ``error``; a fault of the machine (``EnvironmentFault``) is ``setup``. Only
``KeyboardInterrupt`` ends a run early: one backend never stops the others, and every backend call
gets its own copy of the inputs.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

from moeconf.backends import Backend, Observation, RunRequest, resolve_backend, with_world_size
from moeconf.backends.base import (
    EnvironmentFault,
    MultiRankBackend,
    RankFailure,
    StepsObservation,
    StepsRequest,
    is_multi_rank,
)
from moeconf.devices import DTYPES
from moeconf.harness.cases import CASES, Case, CaseError, make_inputs
from moeconf.harness.checks import CHECKS, CheckInput, Outcome, applicable_checks
from moeconf.harness.partition_checks import PARTITION_CHECKS, STEPS_CASE, steps_outcomes
from moeconf.harness.rejection import REJECTION_CHECK, rejection_outcome
from moeconf.harness.samples import UnknownConfig as UnknownConfig  # re-exported: the CLI's one import
from moeconf.harness.samples import check_selectors as check_selectors
from moeconf.harness.samples import samples
from moeconf.harness.status import Status, declared_verdict
from moeconf.harness.steps import StepsReference, make_steps
from moeconf.harness.validate import MalformedObservation, describe, validate_observation, validate_steps
from moeconf.harness.watchdog import CallTimeout, call_with_deadline
from moeconf.hf.configs import DEFAULT_HYPOTHESIS_EXAMPLES, InvalidConfig, at_config, probe_at
from moeconf.reference import reference_forward, reference_gradients, reference_loss_gradients
from moeconf.registry import ArchEntry, get_entry
from moeconf.registry.config_space import TINY, ConfigSample
from moeconf.registry.versions import WRITTEN_AGAINST, absent_reason, installed

DEFAULT_CONFIGS: tuple[str, ...] = ("tiny", "published")
"""``moeconf check``'s config samples without ``--config``: the registered tiny config and every released
checkpoint's values (the fast subset; the test sessions add ``default`` and ``hypothesis``)."""

DRAWN_KINDS = frozenset({"default", "published", "hypothesis", "invalid"})
"""Config samples other than the one a declaration was written and proven at (``tiny``): a declared xfail
that passes there is out of reach at that config (a 5.0 bug that needs k = 2 of 8), not stale."""

DEFAULT_TIMEOUT_S = 300.0
"""Per-case deadline of a backend call (``--timeout``): generous for a tiny block on a loaded 2-core
machine (a case takes milliseconds to seconds), finite so that a stuck kernel cannot stall a gate."""


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
    config: str = "tiny"
    """The config sample (``--config``) the record was judged at."""

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
    timeout_s: float = DEFAULT_TIMEOUT_S
    """Deadline of one backend call (a multi-rank session gets it once per case); 0 or inf: none."""
    world_size: int | None = None
    """Ranks of every multi-rank backend (``--world-size``); None: each backend's own (2)."""
    configs: tuple[str, ...] = ("tiny",)
    """Config samples (``--config``): kinds (``tiny``, ``default``, ``published``, ``hypothesis``) or sample
    names (``published:qwen3-30b-a3b``, ``hypothesis:2``); see ``moeconf.hf.configs``."""
    hypothesis_examples: int = DEFAULT_HYPOTHESIS_EXAMPLES
    """Variants per entry of the ``hypothesis`` kind."""
    program: str = field(default="moeconf", compare=False)


def repro_command(
    sel: Selection, arch: str, backend: str, dtype: str, case: str, check: str, config: str = "tiny"
) -> str:
    """A command line that reruns exactly one record."""
    args = [
        *shlex.split(sel.program),
        "check",
        "--arch",
        arch,
        "--config",
        config,
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
    if sel.world_size is not None:
        args += ["--world-size", str(sel.world_size)]
    return shlex.join(args)


def _records(
    sel: Selection,
    entry: ArchEntry,
    backend_name: str,
    dtype: str,
    case: Case,
    checks: Iterable[str],
    outcome_of: Callable[[str], Outcome],
    status_of: Callable[[str], Status | None] = lambda _c: None,
) -> list[CheckResult]:
    """One record per check: ``outcome_of(check)`` judged under the registry's declarations, unless
    ``status_of(check)`` fixes the status (an error or setup outcome is never excused by an xfail)."""
    records = []
    for check in checks:
        fixed = status_of(check)
        expectation = entry.expectation(check, backend_name, dtype, sel.device, case.name)
        if fixed is not None:
            outcome, status = outcome_of(check), fixed
        elif expectation is not None and expectation.status == "skip":
            status, prefix = declared_verdict(None, "skip", expectation.reason)
            outcome = Outcome(None, message=prefix)
        else:
            outcome = outcome_of(check)
            declared = expectation.status if expectation else None
            status, prefix = declared_verdict(
                outcome.passed,
                declared,
                expectation.reason if expectation else "",
                strict=entry.sample.kind not in DRAWN_KINDS,
            )
            if prefix:
                outcome = dataclasses.replace(outcome, message=f"{prefix} {outcome.message}".strip())
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
                repro=repro_command(sel, entry.model_type, backend_name, dtype, case.name, check, entry.sample.name),
                config=entry.sample.name,
            )
        )
    return records


def _one_line(exc: BaseException) -> str:
    """``Type: message at file:line`` of the innermost frame (the code that raised, not moeconf's)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    site = getattr(exc, "call_site", None)  # the torch_npu emulator's rejections name their caller's line
    if isinstance(site, str) and site and site in text:
        where = ""
    return f"{type(exc).__name__}: {text}{where}" if text else f"{type(exc).__name__}{where}"


def _evidence_check(checks: list[str]) -> str:
    """The one record of a case that carries long evidence (stacks); the others get one line."""
    return "no_hang" if "no_hang" in checks else (checks[0] if checks else "")


def _raised_records(
    sel: Selection,
    entry: ArchEntry,
    name: str,
    dtype: str,
    case: Case,
    checks: list[str],
    exc: BaseException,
    during: str = "backend",
) -> list[CheckResult]:
    """Records of a backend call (``during``: ``"backend"`` for run/run_session, ``"supports()"``)
    that did not produce an observation.

    - ``RankFailure`` (ranks hung or died): ``fail``; every rank's evidence once, on ``no_hang`` (or
      the first check when the case has none), a one-line summary on the others.
    - ``EnvironmentFault``: ``setup``; ``CallTimeout``: ``error``, the stack where it was stuck once
      (as above); anything else the backend raised (``SystemExit`` included): ``error``.
    """
    evidence = _evidence_check(checks)
    if isinstance(exc, RankFailure):
        summary = Outcome(False, message=exc.summary)
        full = Outcome(False, message=f"{exc.summary}\n{exc.detail}".rstrip())
        return _records(sel, entry, name, dtype, case, checks, lambda c: full if c == evidence else summary)
    stack = ""
    if isinstance(exc, EnvironmentFault):
        status: Status = "setup"
        message = f"environment: {exc}"
    elif isinstance(exc, CallTimeout):
        status = "error"
        fate = "stopped" if exc.stopped else "left running in the background (blocked in native code or importing)"
        message = f"{during} timed out: {exc} (--timeout); {fate}"
        stack = f"; it was at:\n{exc.stack.rstrip()}"
    elif isinstance(exc, MalformedObservation):
        status, message = "error", f"malformed observation: {exc}"
    elif isinstance(exc, CaseError):
        status, message = "error", f"inputs: {exc}"
    else:
        status, message = "error", f"{during} raised {_one_line(exc)}"
    one_line = Outcome(None, message=f"{message} (stack on the {evidence} record)" if stack else message)
    full = Outcome(None, message=message + stack)
    return _records(
        sel, entry, name, dtype, case, checks, lambda c: full if c == evidence else one_line, lambda _c: status
    )


def _fixed_records(
    sel: Selection,
    entry: ArchEntry,
    name: str,
    dtype: str,
    case: Case,
    checks: list[str],
    status: Status,
    message: str,
) -> list[CheckResult]:
    return _records(sel, entry, name, dtype, case, checks, lambda _c: Outcome(None, message=message), lambda _c: status)


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
    outcomes: dict[str, Outcome] = {}
    unreadable: set[str] = set()
    for check in checks:
        try:
            outcomes[check] = CHECKS[check](ci)
        except Exception as exc:  # noqa: BLE001 - a form the validation did not foresee: the observation's fault
            unreadable.add(check)
            outcomes[check] = Outcome(
                None, message=f"malformed observation: {check} could not read it: {_one_line(exc)}"
            )
    return _records(
        sel, entry, name, dtype, case, checks, outcomes.__getitem__, lambda c: "error" if c in unreadable else None
    )


def _steps_records(
    sel: Selection,
    entry: ArchEntry,
    name: str,
    dtype: str,
    steps_ref: StepsReference | None,
    result: StepsObservation | BaseException,
) -> list[CheckResult]:
    checks = [c for c in PARTITION_CHECKS if c in sel.checks]
    case = Case(STEPS_CASE, 1, 1, "none", "adversarial multi-step routing")
    if isinstance(result, BaseException):
        return _raised_records(sel, entry, name, dtype, case, checks, result)
    assert steps_ref is not None  # the engine computes it whenever it asks for steps
    try:
        outcomes = steps_outcomes(steps_ref, result, dtype)
    except Exception as exc:  # noqa: BLE001 - as in _as_records: a form the validation did not foresee
        return _raised_records(sel, entry, name, dtype, case, checks, MalformedObservation(_one_line(exc)))
    return _records(sel, entry, name, dtype, case, checks, lambda c: outcomes[c])


def _call(sel: Selection, fn: Callable[[], object], cases: int = 1) -> object:
    """A backend call under the watchdog; its result or the exception it ended with."""
    try:
        return call_with_deadline(fn, sel.timeout_s * max(1, cases))
    except (KeyboardInterrupt, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit from a backend is its error, not ours
        return exc


def _private(request: RunRequest) -> RunRequest:
    """The request with its own copies of the tensors.

    NOTE: every backend of an (arch, case) gets the same canonical inputs; a backend that writes into
    them (an in-place cast, an optimizer step on the loaded params) or a timed-out call still running
    in the background must not change what the next backend is judged on.
    """
    return dataclasses.replace(
        request,
        params={k: v.clone() for k, v in request.params.items()},
        hidden=request.hidden.clone(),
        attention_mask=request.attention_mask.clone(),
        grad_output=request.grad_output.clone(),
        token_types=None if request.token_types is None else request.token_types.clone(),
    )


def _session_results(
    outcome: object, prepared: list[tuple[Case, RunRequest]], steps_request: StepsRequest | None
) -> tuple[list[Observation | BaseException], StepsObservation | BaseException | None]:
    """Per-case results and the steps result of ``run_session``'s return value, its form checked:
    a wrong count would silently drop (or misattribute) cases, so it errors every record."""
    if isinstance(outcome, BaseException):
        return [outcome] * len(prepared), outcome
    try:
        if not isinstance(outcome, tuple | list) or len(outcome) != 2:
            raise MalformedObservation(
                f"run_session() returned {describe(outcome)}, expected (observations, steps observation)"
            )
        observations, steps = outcome
        if not isinstance(observations, list | tuple) or len(observations) != len(prepared):
            raise MalformedObservation(
                f"run_session() returned {describe(observations)} as observations, expected a list of "
                f"{len(prepared)} (one per case, in order)"
            )
    except MalformedObservation as exc:
        return [exc] * len(prepared), exc
    results = [_validated(obs, req) for obs, (_, req) in zip(observations, prepared)]
    steps_result = None if steps_request is None else _validated_steps(steps, steps_request)
    return results, steps_result


def _session_records(
    sel: Selection,
    entry: ArchEntry,
    name: str,
    backend: MultiRankBackend,
    dtype: str,
    checks: list[str],
    prepared: list[tuple[Case, RunRequest]],
    check_input: Callable[[Case], Callable[[Observation], CheckInput]],
) -> Iterator[list[CheckResult]]:
    """A multi-rank backend: every case plus the adversarial steps in one launch (``run_session``)."""
    want_steps = STEPS_CASE in sel.cases and any(c in sel.checks for c in PARTITION_CHECKS)
    steps_ref = None
    steps_request = None
    results: list[Observation | BaseException]
    steps_result: StepsObservation | BaseException | None = None
    out_of_reach: CaseError | None = None
    launch = True
    if want_steps:
        try:
            # NOTE: one batch per rank: the local backends' world size (``--world-size``), or a job's
            # under torchrun (``moeconf.partition``); a backend that says nothing gets make_steps' 2.
            world = _steps_world(backend)
            kwargs = {} if world is None else {"world_size": world}
            # capability flag: the backend's rank job weighs the router losses and accumulates
            router_losses = bool(getattr(backend, "router_losses_in_steps", False))
            steps_request, steps_ref = make_steps(
                entry, DTYPES[dtype], sel.device, seed=sel.seed, router_losses=router_losses, **kwargs
            )
        except CaseError as exc:
            if entry.sample.kind == "tiny":  # unusable adversarial inputs: a spec/case mismatch fails the launch
                results, steps_result, launch = [exc] * len(prepared), exc, False
            else:
                # At a config sample the steps' routing constraints may not hold (256 experts in 8 groups of
                # which a token keeps 4: no rank batch routes inside an unequal expert subset): the cases still
                # run, and the steps' checks are skipped with the reason, as an out-of-reach case is.
                out_of_reach, want_steps = exc, False
    if launch:
        requests = [_private(req) for _, req in prepared]
        outcome = _call(sel, lambda: backend.run_session(requests, steps_request), len(prepared) + 1)
        results, steps_result = _session_results(outcome, prepared, steps_request)
        results = _evidence_once(results, steps_result if want_steps else None)
    for (case, _), result in zip(prepared, results):
        yield _as_records(sel, entry, name, dtype, case, checks, result, check_input(case))
    if want_steps:
        assert steps_result is not None  # set whenever steps were asked for
        yield _steps_records(sel, entry, name, dtype, steps_ref, steps_result)
    if out_of_reach is not None:
        case = Case(STEPS_CASE, 1, 1, "none", "adversarial multi-step routing")
        steps_checks = [c for c in PARTITION_CHECKS if c in sel.checks]
        message = f"inputs: {out_of_reach} (out of reach at this config)"
        yield _records(sel, entry, name, dtype, case, steps_checks, lambda _c: Outcome(None, message=message))


def _steps_world(backend: MultiRankBackend) -> int | None:
    """The steps' world size: the local backends' (``--world-size``), or a job's under torchrun."""
    world = getattr(backend, "steps_world_size", None)
    return None if world is None else int(world)


def _evidence_once(
    results: list[Observation | BaseException], steps_result: object
) -> list[Observation | BaseException]:
    """One launch failed as a whole: its evidence (every rank's stack) goes on one record only — the
    steps' ``no_hang`` when the steps ran, else the first case's — the other cases say one line."""
    first = next((i for i, r in enumerate(results) if isinstance(r, RankFailure)), None)
    if first is None:
        return results
    where = "the adversarial_steps no_hang record" if steps_result is not None else "the first case's record"
    keep = None if steps_result is not None else first
    return [
        r
        if not isinstance(r, RankFailure) or i == keep
        else RankFailure(r.kind, f"{r.summary} (every rank's evidence on {where})", "", r.run_id)
        for i, r in enumerate(results)
    ]


def _validated(obs: object, request: RunRequest) -> Observation | BaseException:
    try:
        return validate_observation(obs, request)
    except MalformedObservation as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - validation could not even read it (a tensor subclass, ...)
        return MalformedObservation(f"unreadable: {_one_line(exc)}")


def _validated_steps(obs: object, request: StepsRequest) -> StepsObservation | BaseException:
    try:
        return validate_steps(obs, request)
    except MalformedObservation as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - as in _validated
        return MalformedObservation(f"steps unreadable: {_one_line(exc)}")


def _support(
    sel: Selection, backend: Backend, name: str, entry: ArchEntry, dtype: str
) -> tuple[Status, str] | BaseException | None:
    """None when ``backend`` runs (entry, dtype); else the status and message of every record
    (``skip`` with its reason), or what ``supports()`` raised.

    NOTE: ``supports()`` is the backend's code too: it runs under the same deadline as ``run()``,
    and whatever it raises or returns outside its contract is an ``error``, not a crash of the run.
    """
    absent = absent_reason(entry.model_type)
    if absent is not None:  # no backend can build a block the installed transformers does not have
        return "skip", absent
    whole = entry.expectation("", name, dtype, sel.device)  # check "" matches only a check-wide declaration
    if whole is not None and whole.status == "skip" and whole.check is None:
        return "skip", f"declared skip: {whole.reason}"  # nothing to run: the block cannot be built
    try:
        dtypes = backend.dtypes
    except Exception as exc:  # noqa: BLE001 - a property of the backend's own that raised
        dtypes = exc
    if not isinstance(dtypes, tuple | list | set | frozenset) or not all(isinstance(d, str) for d in dtypes):
        got = _one_line(dtypes) if isinstance(dtypes, BaseException) else describe(dtypes)
        return "error", f"backend.dtypes: expected a tuple of dtype names such as ('fp32', 'bf16'), got {got}"
    if dtype not in dtypes:
        return "skip", f"{name} does not run {dtype}"
    answer = _call(sel, lambda: backend.supports(entry, dtype, sel.device))
    if isinstance(answer, BaseException):
        return answer
    if answer is None:
        return None
    if not isinstance(answer, str):
        return "error", f"supports() returned {describe(answer)}, expected None or a one-line reason (str)"
    return "skip", answer.strip() or f"{name} does not support this (supports() gave no reason)"


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
            inputs = make_inputs(entry.spec, case, torch_dtype, sel.seed, selection_bias=entry.sample.bias)
            types = inputs.token_types
            reference = reference_forward(entry.spec, inputs.params, inputs.hidden, inputs.attention_mask, types)
            ref_grads = reference_gradients(entry.spec, inputs.params, inputs.hidden, inputs.grad_output, types)
            loss_grads = reference_loss_gradients(
                entry.spec, inputs.params, inputs.hidden, inputs.attention_mask, types
            )
        except CaseError as exc:
            # At a config sample a case can be out of reach (k = E: no token avoids the last expert; a
            # dominating selection bias: none reaches expert 0): that says nothing of the block.
            passed = None if entry.sample.kind != "tiny" else False
            reach = " (out of reach at this config)" if passed is None else ""
            for name in backends:
                yield _records(
                    sel,
                    entry,
                    name,
                    dtype,
                    case,
                    checks,
                    lambda _c, e=exc, p=passed, r=reach: Outcome(p, message=f"inputs: {e}{r}"),
                )
            continue
        except Exception as exc:  # noqa: BLE001 - moeconf could not draw inputs for this spec: its own defect
            message = f"inputs or reference: moeconf could not compute them for this spec: {_one_line(exc)}"
            for name in backends:
                yield _fixed_records(sel, entry, name, dtype, case, checks, "error", message)
            continue
        request = RunRequest(
            entry,
            inputs.params,
            inputs.hidden,
            inputs.attention_mask,
            inputs.grad_output,
            torch_dtype,
            sel.device,
            token_types=types,
        )
        prepared.append((case, request))
        references[case.name] = (reference, ref_grads, loss_grads)

    def check_input(case: Case) -> Callable[[Observation], CheckInput]:
        reference, ref_grads, loss_grads = references[case.name]
        return lambda obs: CheckInput(entry.spec, reference, ref_grads, obs, dtype, loss_grads)

    for name, backend in backends.items():
        support = _support(sel, backend, name, entry, dtype)
        if isinstance(support, BaseException):
            for case, _ in prepared:
                yield _raised_records(sel, entry, name, dtype, case, checks, support, during="supports()")
            continue
        if support is not None:
            status, message = support
            for case, _ in prepared:
                if status == "skip":  # judged like any unobservable check (a declared skip keeps its reason)
                    yield _records(
                        sel, entry, name, dtype, case, checks, lambda _c, m=message: Outcome(None, message=m)
                    )
                else:
                    yield _fixed_records(sel, entry, name, dtype, case, checks, status, message)
            continue
        if is_multi_rank(backend):
            yield from _session_records(sel, entry, name, backend, dtype, checks, prepared, check_input)  # type: ignore[arg-type]
            continue
        for case, request in prepared:
            private = _private(request)
            outcome = _call(sel, lambda run=backend.run, private=private: run(private))  # type: ignore[misc]
            result = outcome if isinstance(outcome, BaseException) else _validated(outcome, request)
            yield _as_records(sel, entry, name, dtype, case, checks, result, check_input(case))


def run_selection(sel: Selection) -> Iterator[list[CheckResult]]:
    """Every record of the selection, a (arch, config, backend, dtype, case) group at a time (for progress)."""
    backends = {name: with_world_size(resolve_backend(name), sel.world_size) for name in sel.backends}
    for arch in sel.archs:
        for sample, entry in config_variants(sel, get_entry(arch)):
            for dtype in sel.dtypes:
                yield from run_variant(sel, entry, backends, dtype)


def config_variants(sel: Selection, registered: ArchEntry) -> list[tuple[ConfigSample, ArchEntry | SampleError]]:
    """The registered entry at each config sample ``sel.configs`` chooses (``moeconf.hf.configs``), or
    why that sample cannot be built."""
    try:
        chosen = _samples(registered, sel)
    except (KeyboardInterrupt, GeneratorExit):
        raise
    except Exception as exc:  # noqa: BLE001 - reading the entry's config fields failed: moeconf's defect
        kinds = [k for k in dict.fromkeys(s.split(":", 1)[0] for s in sel.configs) if k != "tiny"]
        failed: list[tuple[ConfigSample, ArchEntry | SampleError]] = [
            (sample, SampleError(registered, sample, exc))
            for sample in (ConfigSample(k, k) for k in kinds)  # type: ignore[arg-type]
        ]
        return ([(TINY, at_config(registered, TINY))] if "tiny" in sel.configs else []) + failed
    return [(sample, _at(registered, sample)) for sample in chosen]


def run_variant(
    sel: Selection, entry: ArchEntry | SampleError, backends: dict[str, Backend], dtype: str
) -> Iterator[list[CheckResult]]:
    """``run_arch`` of an entry at one config sample, or the error records of a sample that cannot be built."""
    if isinstance(entry, SampleError):
        yield _sample_error(sel, entry, backends, dtype)
    else:
        yield from run_arch(sel, entry, backends, dtype)


@dataclass(frozen=True)
class SampleError:
    """A config sample of ``entry`` that could not be built, and why."""

    entry: ArchEntry
    sample: ConfigSample
    exc: BaseException
    judge_rejection: bool = False
    """The sample describes no valid layer on purpose (or is the class's defaults): ``config_rejects_invalid``
    judges whether transformers refuses it; otherwise the failure to build it is moeconf's (error)."""


def _samples(entry: ArchEntry, sel: Selection) -> list[ConfigSample]:
    """The entry's config samples ``sel.configs`` chooses; only ``tiny`` for a type the installed
    transformers lacks (its skip records, once: the other samples are built from its config class)."""
    if absent_reason(entry.model_type) is not None:
        return [TINY]
    return samples(entry, sel.configs, sel.hypothesis_examples)


def _at(entry: ArchEntry, sample: ConfigSample) -> ArchEntry | SampleError:
    """The entry at ``sample``, or why it cannot be built (``tiny`` is the registered entry itself).

    A sample with no valid spec is judged by ``config_rejects_invalid`` when it is meant to be invalid
    (``invalid``) or is the config class's own defaults (``default``: a class whose defaults describe
    no layer must refuse them); for a drawn ``hypothesis`` sample it is moeconf's misreading (error).
    """
    if sample.kind == "tiny":
        return at_config(entry, sample)
    if sample.kind == "invalid":
        try:
            variant = at_config(entry, sample)
        except InvalidConfig as exc:
            return SampleError(entry, sample, exc, judge_rejection=True)
        except Exception as exc:  # noqa: BLE001 - the config class refused it: the rejection check passes
            return SampleError(entry, sample, exc, judge_rejection=True)
        return SampleError(
            variant, sample, InvalidConfig(f"moeconf derives a valid spec from {sample.describe()}"), False
        )
    try:
        return at_config(entry, sample)
    except (KeyboardInterrupt, GeneratorExit):
        raise
    except InvalidConfig as exc:
        return SampleError(entry, sample, exc, judge_rejection=sample.kind == "default")
    except Exception as exc:  # noqa: BLE001 - the config class rejected the sample, or the spec did
        return SampleError(entry, sample, exc)


def _sample_error(sel: Selection, failed: SampleError, backends: dict[str, Backend], dtype: str) -> list[CheckResult]:
    """One ``error`` record per backend for a config sample that cannot be built.

    Samples are drawn valid, so a config class that rejects one, or a derived spec that is invalid, is
    moeconf's misreading of the config (the fields named), not a verdict on the block.
    """
    sample, exc = failed.sample, failed.exc
    case = Case("config", 1, 1, "none", "building the config sample")
    if failed.judge_rejection:
        probe, config_error = probe_at(failed.entry, sample)
        outcome = rejection_outcome(probe, config_error, _one_line(exc), _one_line)
        return [
            record
            for name in backends
            for record in _records(sel, probe, name, dtype, case, [REJECTION_CHECK], lambda _c: outcome)
        ]
    what = "the derived spec is invalid" if isinstance(exc, InvalidConfig) else "the config class rejected it"
    message = f"config {sample.name} ({sample.describe()}): {what}: {_one_line(exc)}"
    status: Status = "error"
    if installed() < WRITTEN_AGAINST:
        # The config fields and published values are written against the latest release; an older config
        # class may lack or spell differently what a sample sets. The tiny config still judges that release.
        status = "skip"
        message = (
            f"transformers {installed()} cannot build this sample (samples are written for {WRITTEN_AGAINST}): "
            + message
        )
    variant = dataclasses.replace(failed.entry, sample=sample)
    return [
        record
        for name in backends
        for record in _fixed_records(sel, variant, name, dtype, case, ["output"], status, message)
    ]
