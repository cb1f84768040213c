"""A hostile backend cannot crash, stall or mislead the gate.

Each backend of ``tests.reliability.hostile`` breaks the contract on one architecture (``TARGET``)
and behaves on another (``BYSTANDER``). For each, the run finishes; the target's records say
``error`` (a broken backend: the field, what was expected and what came back, on one line) or
``fail`` (the code under test computed garbage: non-finite values); and the bystander's records
are complete and green.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moeconf.backends import HFBlockBackend, RunRequest
from moeconf.harness.cases import CASES, make_inputs
from moeconf.harness.checks import applicable_checks
from moeconf.harness.engine import CheckResult, Selection, run_selection
from moeconf.harness.partition_checks import PARTITION_CHECKS, STEPS_CASE
from moeconf.harness.validate import MalformedObservation, validate_observation
from moeconf.harness.watchdog import CallTimeout, call_with_deadline
from moeconf.registry import REGISTRY
from tests.reliability import hostile as H

ROOT = Path(__file__).resolve().parents[2]
ARCHS = (H.TARGET, H.BYSTANDER)
CASE_NAMES = tuple(c.name for c in CASES)


def hostile(name: str) -> str:
    return f"tests.reliability.hostile:{name}"


def run(
    *backends: str,
    dtype: str = "fp32",
    archs: tuple[str, ...] = ARCHS,
    cases: tuple[str, ...] = CASE_NAMES,
    timeout_s: float = 120.0,
) -> list[CheckResult]:
    sel = Selection(archs=archs, backends=backends, dtypes=(dtype,), cases=cases, timeout_s=timeout_s)
    return [r for group in run_selection(sel) for r in group]


def of(records: list[CheckResult], arch: str, backend: str | None = None) -> list[CheckResult]:
    return [r for r in records if r.arch == arch and (backend is None or r.backend == backend)]


def assert_complete(records: list[CheckResult], arch: str, cases: tuple[str, ...] = CASE_NAMES) -> None:
    """One record per (case, check): nothing was dropped."""
    checks = applicable_checks(REGISTRY[arch].spec)
    assert sorted((r.case, r.check) for r in records) == sorted((c, k) for c in cases for k in checks)


def assert_green(records: list[CheckResult], arch: str, cases: tuple[str, ...] = CASE_NAMES) -> None:
    assert_complete(records, arch, cases)
    assert {r.status for r in records} <= {"pass", "xfail"}, [(r.case, r.check, r.message) for r in records]


def assert_errors(records: list[CheckResult], *texts: str) -> None:
    """Every record an ``error`` whose one-line message names the field (``texts``)."""
    assert records and {r.status for r in records} == {"error"}, {(r.status, r.message) for r in records}
    for r in records:
        assert "\n" not in r.message, r.message
        for text in texts:
            assert text in r.message, r.message


def target_and_bystander(backend: str, dtype: str = "fp32") -> list[CheckResult]:
    """The hostile backend's target records; asserts its bystander records are complete and green."""
    records = run(hostile(backend), dtype=dtype)
    assert_green(of(records, H.BYSTANDER), H.BYSTANDER)
    target = of(records, H.TARGET)
    assert_complete(target, H.TARGET)
    return target


@pytest.fixture(scope="module")
def warm() -> None:
    """Import transformers' modeling code before a test with a short deadline (the first block of a
    process takes seconds to import; that is not the hang under test)."""
    run("hf-eager", cases=("single_token",))


# --- 1. malformed observations: one error per check, the field named, the next arch still runs -----
@pytest.mark.parametrize(
    ("backend", "field"),
    [
        ("expert_grad_transposed", "grads['experts.w_up']: expected shape [8, 24, 32], got a float32 tensor of shape [8, 32, 24]"),
        ("weights_k1", "topk_weights: expected shape ["),
        ("aux_not_scalar", "aux_loss: expected a scalar (one element), got a float32 tensor of shape [3]"),
        ("returns_none", "run() returned NoneType None, expected moeconf.backends.Observation"),
        ("returns_numpy", "run() returned numpy.ndarray, expected moeconf.backends.Observation"),
    ],
)  # fmt: skip
def test_malformed_observation_is_an_error_naming_the_field(backend: str, field: str) -> None:
    target = target_and_bystander(backend)
    assert_errors(target, "malformed observation: ", field)


def test_topk_weights_of_width_one_names_expected_and_got_shape() -> None:
    target = target_and_bystander("weights_k1")
    random = [r for r in target if r.case == "random"]
    assert_errors(random, "topk_weights: expected shape [16, 2], got a float32 tensor of shape [16, 1]")


# --- 2. SystemExit inside run(): an error record, the run goes on; KeyboardInterrupt propagates ------
def test_system_exit_in_run_is_an_error_record() -> None:
    target = target_and_bystander("exits")
    assert_errors(target, "backend raised SystemExit: 3 at hostile.py:")


def test_keyboard_interrupt_still_stops_the_run() -> None:
    with pytest.raises(KeyboardInterrupt):
        run(hostile("interrupted"), archs=(H.TARGET,), cases=("single_token",))


# --- 3. a run() that never returns: an error with its stack, the next case runs ------------------------
def _hung_thread_alive(function: str) -> bool:
    frames = sys._current_frames()
    for thread in threading.enumerate():
        frame = frames.get(thread.ident or -1)
        while frame is not None:
            if frame.f_code.co_name == function:
                return True
            frame = frame.f_back
    return False


def _assert_timed_out_in(target: list[CheckResult], function: str, fate: str) -> None:
    hung = [r for r in target if r.case == "random"]
    assert {r.status for r in hung} == {"error"}
    evidence = next(r for r in hung if r.check == "routing")  # the case's first check carries the stack
    assert evidence.message.startswith("backend timed out: did not return within 2 s (--timeout); " + fate)
    assert f"in {function}" in evidence.message  # the function it was stuck in, from its Python stack
    assert "watchdog.py" not in evidence.message and "threading.py" not in evidence.message
    for r in hung:
        if r is not evidence:
            assert "\n" not in r.message and "stack on the routing record" in r.message
    # the later cases of the same backend on the same arch ran and passed
    assert_green([r for r in target if r.case != "random"], H.TARGET, CASE_NAMES[1:])


def test_a_hang_is_an_error_with_the_stack_and_the_run_continues(warm: None) -> None:
    start = time.perf_counter()
    records = run(hostile("hangs"), timeout_s=2)
    assert time.perf_counter() - start < 60
    assert_green(of(records, H.BYSTANDER), H.BYSTANDER)
    _assert_timed_out_in(of(records, H.TARGET), "stuck_in_kernel", "stopped")
    assert not _hung_thread_alive("stuck_in_kernel")  # asked to stop, it unwound: no CPU, no thread left


def test_an_abandoned_call_releases_its_lock_and_cpu(warm: None) -> None:
    """The hung call spins in Python holding a lock that every later call of the backend takes: the
    watchdog stops it, so the lock is free and the later cases (and the bystander) pass."""
    records = run(hostile("spins_with_lock"), timeout_s=2)
    assert_green(of(records, H.BYSTANDER), H.BYSTANDER)
    _assert_timed_out_in(of(records, H.TARGET), "spin_holding_lock", "stopped")
    assert not _hung_thread_alive("spin_holding_lock")
    assert H.LOCK.acquire(timeout=1)
    H.LOCK.release()


def test_a_call_blocked_in_native_code_is_left_behind_and_said_so(warm: None) -> None:
    records = run(hostile("blocks_in_native"), timeout_s=2)
    assert_green(of(records, H.BYSTANDER), H.BYSTANDER)
    _assert_timed_out_in(of(records, H.TARGET), "blocked_in_native", "left running in the background")


def test_the_watchdog_carries_thread_state_and_reraises() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:  # torch's intra-op thread count is per OS thread: the worker must get the caller's
        assert call_with_deadline(torch.get_num_threads, 10) == 3
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(SystemExit):
        call_with_deadline(lambda: sys.exit(3), 10)
    assert call_with_deadline(lambda: 7, 0) == 7  # 0 / None / inf: no deadline
    assert call_with_deadline(lambda: 7, float("inf")) == 7
    with pytest.raises(CallTimeout) as info:
        call_with_deadline(lambda: H.stuck_in_kernel(), 0.2)
    assert info.value.stopped and "in stuck_in_kernel" in info.value.stack


# --- 4. the compute dtype is held: a backend computing in float64 errors, a float32 router does not -----
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_a_backend_ignoring_the_dtype_is_an_error(dtype: str) -> None:
    wanted = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
    target = target_and_bystander("ignores_dtype", dtype=dtype)
    assert_errors(target, f"output: expected {wanted} (the requested compute dtype), got a float64 tensor")


def test_float64_grads_in_a_bf16_run_are_an_error() -> None:
    target = target_and_bystander("grads_fp64", dtype="bf16")
    assert_errors(target, "grads['router.weight']: expected bfloat16 or float32", "got a float64 tensor")


def test_the_input_grad_must_have_the_compute_dtype() -> None:
    target = target_and_bystander("input_grad_fp32", dtype="bf16")
    assert_errors(target, "grads['input']: expected bfloat16 (the compute dtype", "got a float32 tensor")


def test_a_router_kept_in_float32_in_a_bf16_run_is_legitimate() -> None:
    assert_green(of(run(hostile("router_fp32"), dtype="bf16"), H.TARGET), H.TARGET)


# --- 5. a float topk_index is not truncated into a pass ----------------------------------------------------
def test_a_float_topk_index_is_an_error() -> None:
    target = target_and_bystander("float_index")
    assert_errors(target, "topk_index: expected an integer tensor, got a float64 tensor")


# --- 6. non-finite values are the code under test computing garbage: fail, the field named -------------
def test_nan_in_the_output_fails_the_output_check_only() -> None:
    target = target_and_bystander("nan_output")
    output = [r for r in target if r.check == "output"]
    assert {r.status for r in output} == {"fail"}
    for r in output:
        assert r.message.startswith("output[") and ": got nan, expected " in r.message, r.message
        assert "values non-finite" in r.message
    assert {r.status for r in target if r.check != "output"} == {"pass"}


def test_inf_in_an_expert_grad_fails_grad_experts_only() -> None:
    target = target_and_bystander("inf_expert_grad")
    failing = [r for r in target if r.status != "pass"]
    assert {(r.check, r.status) for r in failing} == {("grad_experts", "fail")}
    assert all("grad experts.w_down[" in r.message and ": got inf" in r.message for r in failing)


# --- 7. other breaches of the contract ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("backend", "field"),
    [
        ("grads_list", "grads: expected a dict of canonical name -> tensor, got a list of 5"),
        ("grads_unknown_name", "grads: unknown parameter 'experts.w_upp'"),
        ("grad_on_meta", "grads['experts.w_up']: expected a tensor on cpu, got a float32 tensor of shape [8, 24, 32] on meta"),
        ("missing_grads_str", "missing_grads: expected a tuple of str, got str 'experts.w_up[3]'"),
        ("missing_grads_none", "missing_grads: expected a tuple of str, got NoneType None"),
    ],
)  # fmt: skip
def test_contract_breach_is_an_error_naming_the_field(backend: str, field: str) -> None:
    assert_errors(target_and_bystander(backend), "malformed observation: ", field)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a grad on cuda in a cpu run")
def test_a_grad_on_another_device_is_an_error() -> None:
    assert_errors(target_and_bystander("grad_on_cuda"), "grads['experts.w_up']: expected a tensor on cpu")


def test_an_output_not_on_the_requested_device_is_an_error() -> None:
    """A backend asked for CUDA that computes on the CPU tests no CUDA code (no GPU needed to show it)."""
    entry = REGISTRY[H.TARGET]
    inputs = make_inputs(entry.spec, CASES[1], torch.float32, 0)
    request = RunRequest(
        entry, inputs.params, inputs.hidden, inputs.attention_mask, inputs.grad_output, torch.float32, "cpu"
    )
    obs = HFBlockBackend("cpu").run(request)
    validate_observation(obs, request)
    with pytest.raises(MalformedObservation, match=r"^output: expected a tensor on cuda, got a float32 tensor"):
        validate_observation(obs, RunRequest(**{**request.__dict__, "device": "cuda"}))


def test_supports_raising_is_an_error_not_a_crash() -> None:
    assert_errors(
        target_and_bystander("supports_raises"),
        "supports() raised RuntimeError: capability probe crashed at hostile.py:",
    )


def test_supports_returning_a_non_reason_is_an_error() -> None:
    target = target_and_bystander("supports_returns_bool")
    assert_errors(target, "supports() returned bool True, expected None or a one-line reason (str)")


def test_a_broken_dtypes_attribute_errors_that_backend_only() -> None:
    records = run(hostile("dtypes_none"), "hf-eager")
    for arch in ARCHS:
        assert_errors(
            of(records, arch, hostile("dtypes_none")), "backend.dtypes: expected a tuple", "got NoneType None"
        )
        assert_green(of(records, arch, "hf-eager"), arch)


def test_a_backend_writing_into_its_request_does_not_change_the_next_backends_inputs() -> None:
    records = run(hostile("mutates_request"), "hf-eager")
    for arch in ARCHS:
        assert_green(of(records, arch, "hf-eager"), arch)


@pytest.mark.parametrize(
    ("backend", "field"),
    [
        ("session_short", "run_session() returned a list of 3 as observations, expected a list of 4 (one per case, in order)"),
        ("session_long", "run_session() returned a list of 5 as observations, expected a list of 4"),
        ("session_not_tuple", "run_session() returned a list of 4, expected (observations, steps observation)"),
        ("session_none", "run_session() returned NoneType None, expected (observations, steps observation)"),
    ],
)  # fmt: skip
def test_a_session_of_the_wrong_form_errors_every_case(backend: str, field: str) -> None:
    assert_errors(target_and_bystander(backend), "malformed observation: ", field)


@pytest.mark.parametrize(
    ("backend", "field"),
    [
        ("session_no_steps", "steps: expected moeconf.backends.StepsObservation, got NoneType None"),
        ("session_empty_steps", "steps.outputs: expected one entry per step (3), got a list of 0"),
    ],
)
def test_a_missing_or_short_steps_observation_errors_the_partition_checks(backend: str, field: str) -> None:
    records = run(hostile(backend), archs=(H.TARGET,), cases=("single_token", STEPS_CASE))
    assert_green([r for r in records if r.case != STEPS_CASE], H.TARGET, ("single_token",))
    steps = [r for r in records if r.case == STEPS_CASE]
    assert {r.check for r in steps} == set(PARTITION_CHECKS)
    assert_errors(steps, "malformed observation: ", field)


# --- CLI: exit 1, a complete JSON report, no traceback -----------------------------------------------------
def _cli(backend: str, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    report = tmp_path / "report.json"
    args = ["check", "--arch", *ARCHS, "--config", "tiny", "--backend", hostile(backend), "--case", "random", "single_token"]
    args += ["--format", "json", "--output", str(report), "--quiet", *extra]
    proc = subprocess.run(
        [sys.executable, "-m", "moeconf", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert report.exists(), proc.stderr
    return proc, json.loads(report.read_text())


def _assert_cli_report(proc: subprocess.CompletedProcess[str], report: dict, message: str) -> None:
    assert proc.returncode == 1, proc.stderr
    results = report["results"]
    for arch in ARCHS:  # complete: every (case, check) of both archs
        checks = applicable_checks(REGISTRY[arch].spec)
        got = sorted((r["case"], r["check"]) for r in results if r["arch"] == arch)
        assert got == sorted((c, k) for c in ("random", "single_token") for k in checks)
    assert {r["status"] for r in results if r["arch"] == H.BYSTANDER} == {"pass"}
    target = [r for r in results if r["arch"] == H.TARGET and r["case"] == "random"]
    assert {r["status"] for r in target} == {"error"} and all(message in r["message"] for r in target)
    assert report["summary"]["error"] >= len(target) and report["summary"]["ok"] is False


@pytest.mark.parametrize(
    ("backend", "message"),
    [("returns_none", "run() returned NoneType None"), ("exits", "backend raised SystemExit: 3 at hostile.py:")],
)
def test_cli_reports_a_broken_backend_and_exits_1(backend: str, message: str, tmp_path: Path) -> None:
    proc, report = _cli(backend, tmp_path)
    _assert_cli_report(proc, report, message)


def _cli_has_timeout() -> bool:
    proc = subprocess.run(
        [sys.executable, "-m", "moeconf", "check", "--help"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return "--timeout" in proc.stdout


@pytest.fixture
def cli_timeout() -> Iterator[None]:
    if not _cli_has_timeout():
        pytest.skip("moeconf check has no --timeout yet (the engine's deadline is tested through run_selection)")
    yield


def test_cli_reports_a_hang_with_its_stack_and_exits_1(cli_timeout: None, tmp_path: Path) -> None:
    # NOTE: a hang that cannot be stopped (one long native sleep): the process must still exit cleanly.
    # A fresh process: the first block's import of transformers' modeling code (seconds on a loaded
    # machine) must not count against --timeout 2, or the cases after the hang would error too.
    proc, report = _cli("blocks_in_native", tmp_path, "--timeout", "2")
    _assert_cli_report(proc, report, "backend timed out: did not return within 2 s (--timeout)")
    assert any("in blocked_in_native" in r["message"] for r in report["results"])
    after = [r for r in report["results"] if r["arch"] == H.TARGET and r["case"] != "random"]
    assert after and {r["status"] for r in after} == {"pass"}


def test_imports_do_not_count_against_the_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "slow_module_for_watchdog.py").write_text("import time\ntime.sleep(0.6)\nVALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert call_with_deadline(lambda: importlib.import_module("slow_module_for_watchdog").VALUE, 0.2) == 7
    finally:
        sys.modules.pop("slow_module_for_watchdog", None)
