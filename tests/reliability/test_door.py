"""The command line's door: every refusal is one line and exit 2 before any work, interruptions end
in one line with 130/143 and no leftover process, reports are whole files with the user's umask, and
the text report stays readable when many records fail for one reason.

Signals, exit codes and "no traceback" are checked on a real process (``python -m moeconf``) where
the Python runtime's own behaviour matters; the rest in-process.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from moeconf.backends import BackendLoadError, resolve_backend
from moeconf.cli import MAX_SEED, main
from moeconf.distributed.launcher import MultiRankResult, RankOutcome, processes_with_env
from moeconf.harness.engine import CheckResult
from moeconf.harness.report import (
    EVIDENCE_LINES,
    FULL_EVIDENCE_NOTE,
    exit_status,
    to_json,
    to_junit,
    to_text,
    write_atomically,
)
from moeconf.harness.status import Status
from tests.reliability import door_backends

ROOT = Path(__file__).resolve().parents[2]
DOOR = "tests.reliability.door_backends"
ONE_CASE = ["--arch", "mixtral", "--config", "tiny", "--case", "random"]
START_S = 180.0  # a fresh interpreter imports torch + transformers: slow on a loaded 2-core machine


def _one_line_error(err: str, *needles: str) -> str:
    """The single stderr line of a refusal, checked for its prefix, content and no traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("moeconf: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    return lines[0]


def _moeconf(*args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moeconf", *args],
        check=False,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=kw.pop("stdout", subprocess.PIPE),
        stderr=subprocess.PIPE,
        text=True,
        timeout=START_S,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture(autouse=True)
def _no_factory_calls() -> Iterator[None]:
    door_backends.CALLS.clear()
    yield


# --- 1. backend loading -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("moeconf.backends:HFBlockBackend", "needs arguments (name)"),
        (f"{DOOR}:make_named", "needs arguments (name)"),
        (f"{DOOR}:unannotated", "not annotated to return a backend"),
        (f"{DOOR}:returns_int", "returned a int, not a moeconf backend"),
        (f"{DOOR}:raising_factory", "raising_factory() raised RuntimeError: no GPU kernel for this build"),
        (f"{DOOR}:CALLS", "it is a list"),
        (f"{DOOR}:nothing_here", "has no attribute 'nothing_here'"),
        ("os:getpid", "builtin_function_or_method"),
        ("no_such_module_xyz:thing", "No module named 'no_such_module_xyz'"),
        ("justamodule:", "expected package.module:attr"),
    ],
)
def test_a_backend_that_cannot_be_loaded_is_a_one_line_usage_error(
    value: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", *ONE_CASE, "--backend", value, "--quiet"]) == 2
    _one_line_error(capsys.readouterr().err, value, needle)


def test_only_declared_factories_are_called(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []

    def spy() -> int:  # what `os:getpid` resolves to: a callable that is no backend factory
        called.append("getpid")
        return 4242

    monkeypatch.setattr(os, "getpid", spy)
    with pytest.raises(BackendLoadError, match="not annotated to return a backend"):
        resolve_backend("os:getpid")
    assert called == []
    with pytest.raises(BackendLoadError):
        resolve_backend(f"{DOOR}:unannotated")
    with pytest.raises(BackendLoadError):
        resolve_backend(f"{DOOR}:make_named")  # annotated, but needs an argument: not called either
    assert door_backends.CALLS == []
    # What the loader does accept: an annotated factory, a partial of one, a class, an instance.
    assert resolve_backend(f"{DOOR}:make_sleepy").name == "door-sleepy"
    assert resolve_backend(f"{DOOR}:named_partial").name == "door-partial"
    assert resolve_backend(f"{DOOR}:Sleepy").name == "door-sleepy"
    assert door_backends.CALLS == ["make_sleepy", "make_named"]
    with pytest.raises(BackendLoadError, match="returned a int"):
        resolve_backend(f"{DOOR}:returns_int")  # declared a factory, so called; its result is checked


def test_a_backend_module_that_raises_or_does_not_parse_on_import(tmp_path: Path) -> None:
    (tmp_path / "door_raises_on_import.py").write_text("raise RuntimeError('CUDA driver too old')\n")
    (tmp_path / "door_syntax_error.py").write_text("def run(:\n    pass\n")
    (tmp_path / "door_exits_on_import.py").write_text("import sys\nsys.exit(3)\n")
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cases = {
        "door_raises_on_import:B": "importing door_raises_on_import raised RuntimeError: CUDA driver too old",
        "door_syntax_error:B": "importing door_syntax_error raised SyntaxError",
        "door_exits_on_import:B": "importing door_exits_on_import raised SystemExit: 3",
    }
    for value, needle in cases.items():
        done = _moeconf("check", *ONE_CASE, "--backend", value, "--quiet", env=env)
        assert done.returncode == 2, done.stderr
        _one_line_error(done.stderr, needle)


# --- 2. interruption ----------------------------------------------------------------------------


def _wait_for(paths: list[Path], proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + START_S
    while not all(p.exists() for p in paths):
        if proc.poll() is not None:
            raise AssertionError(f"moeconf ended early ({proc.returncode}): {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the backend never started: {proc.communicate()}")
        time.sleep(0.1)


def _interrupt(args: list[str], marker: Path, sig: int, wait_for: list[Path]) -> tuple[int, str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeconf", *args],
        cwd=ROOT,
        env={**os.environ, "DOOR_MARKER": str(marker)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(wait_for, proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def test_ctrl_c_ends_in_one_line_with_130_and_writes_no_report(tmp_path: Path) -> None:
    marker, report = tmp_path / "started", tmp_path / "out" / "r.json"
    report.parent.mkdir()
    args = ["check", *ONE_CASE, "--backend", f"{DOOR}:Sleepy", "--output", str(report), "--quiet"]
    code, out, err = _interrupt(args, marker, signal.SIGINT, [marker])
    assert code == 130, err
    assert "Traceback" not in err and out == ""
    (line,) = err.strip().splitlines()
    assert line == (
        f"moeconf: interrupted by SIGINT: 0 records checked; no report written to {report} "
        "(a report is written whole or not at all)"
    )
    assert list(report.parent.iterdir()) == []  # no report, no temp file
    assert processes_with_env("DOOR_MARKER", str(marker)) == []


def test_sigterm_during_a_multi_rank_run_ends_with_143_and_no_rank_left(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    ranks = [Path(f"{marker}.rank0"), Path(f"{marker}.rank1")]
    args = ["check", *ONE_CASE, "--backend", f"{DOOR}:SleepyRanks"]
    code, out, err = _interrupt(args, marker, signal.SIGTERM, ranks)
    assert code == 143, err
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    # 8. progress named the unit before it started (it never ended), then the one-line verdict.
    # (The backend by its display name: the repro lines keep the import path.)
    assert lines[0].split() == ["mixtral", "door-sleepy-ranks", "fp32", "cpu", "..."], err
    assert lines[-1].startswith("moeconf: interrupted by SIGTERM: 0 records checked; no report written to stdout")
    assert len(lines) == 2, err
    deadline = time.monotonic() + 10  # SIGKILLed ranks are reaped by init: give it a moment
    while processes_with_env("DOOR_MARKER", str(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with_env("DOOR_MARKER", str(marker)) == []


def test_a_signal_ignored_by_the_parent_stays_ignored() -> None:
    from moeconf.cli import _signals_as_interrupts

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job of a script
    try:
        with _signals_as_interrupts():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # handled like Ctrl-C
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


# --- 3. input validation at the door -----------------------------------------------------------


@pytest.mark.parametrize("seed", ["10000000000000000000", str(MAX_SEED + 1), "-1", "abc", "1.5"])
def test_seed_out_of_range_is_refused_in_one_line(seed: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["check", *ONE_CASE, "--seed", seed])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, "--seed", seed)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MOECONF_THREADS", "abc"),
        ("MOECONF_THREADS", "0"),
        ("MOECONF_DEADLINE_S", "abc"),
        ("MOECONF_DEADLINE_S", "-5"),
        ("MOECONF_DEADLINE_S", "inf"),
    ],
)
def test_bad_moeconf_variables_are_refused_before_any_work(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(name, value)
    assert main(["check", *ONE_CASE, "--backend", f"{DOOR}:Sleepy", "--quiet"]) == 2  # Sleepy would block
    _one_line_error(capsys.readouterr().err, f"{name}={value!r}")


def test_bad_moeconf_variable_at_import_time_is_no_traceback() -> None:
    done = _moeconf("list", env={"MOECONF_THREADS": "abc", "MOECONF_DEADLINE_S": "abc"})
    assert done.returncode == 2 and done.stdout == ""
    _one_line_error(done.stderr, "MOECONF_THREADS='abc'")


@pytest.mark.parametrize("where", ["missing_dir", "parent_is_file", "target_is_dir", "proc"])
def test_output_is_checked_first_and_nothing_is_written(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    output = {
        "missing_dir": tmp_path / "missing" / "r.json",
        "parent_is_file": tmp_path / "file" / "r.json",
        "target_is_dir": tmp_path / "dir",
        "proc": Path("/proc/moeconf-door-r.json"),  # exists, but no one (root included) creates files there
    }[where]
    marker = tmp_path / "started"
    monkeypatch.setenv("DOOR_MARKER", str(marker))
    # The Sleepy backend would block for 10 minutes: returning at all shows the check came first.
    assert main(["check", *ONE_CASE, "--backend", f"{DOOR}:Sleepy", "--output", str(output), "--quiet"]) == 2
    _one_line_error(capsys.readouterr().err, str(output))
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]
    assert list((tmp_path / "dir").iterdir()) == []


def test_repeated_names_run_once(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    args = ["--arch", "mixtral", "mixtral", "--config", "tiny", "--case", "random", "random", "--dtype", "fp32", "fp32"]
    args += ["--backend", "hf-eager", "hf-eager", "--check", "output", "routing", "output"]
    assert main(["check", *args, "--output", str(report), "--quiet"]) == 0  # format from the suffix
    results = json.loads(report.read_text())["results"]
    assert sorted((r["arch"], r["backend"], r["case"], r["check"]) for r in results) == [
        ("mixtral", "hf-eager", "random", "output"),
        ("mixtral", "hf-eager", "random", "routing"),
    ]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_bad_timeout_is_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["check", *ONE_CASE, "--timeout", value])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, "--timeout")


def test_timeout_reaches_the_engine(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    args = ["check", *ONE_CASE, "--backend", f"{DOOR}:Sleepy", "--timeout", "0.5", "--output", str(report)]
    start = time.monotonic()
    assert main([*args, "--quiet"]) == 1  # a stuck backend is the backend's error
    assert time.monotonic() - start < 60
    records = json.loads(report.read_text())["results"]
    assert records and all(r["status"] == "error" for r in records)
    assert "did not return within 0.5 s" in records[0]["message"]


def test_a_reader_that_goes_away_is_no_traceback() -> None:
    for args, code in ((["list"], 0), (["check", *ONE_CASE, "--quiet"], 0)):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before moeconf writes: every write is EPIPE
        try:
            done = _moeconf(*args, stdout=write)
        finally:
            os.close(write)
        assert done.returncode == code, done.stderr  # the verdict, not the reader, decides the code
        assert done.stderr == "", done.stderr


def test_stdout_carries_the_report_and_nothing_else() -> None:
    done = _moeconf("check", *ONE_CASE, "--backend", f"{DOOR}:Noisy", "--format", "json", "--quiet")
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["summary"]["error"] > 0  # parses: no noise inside the report
    assert "noise from print()" in done.stderr and "noise from fd 1" in done.stderr


# --- 4. report files ----------------------------------------------------------------------------


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask")
def test_reports_are_written_with_the_umask_and_leave_no_temp_file(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    assert main(["check", *ONE_CASE, "--check", "output", "--output", str(report), "--quiet"]) == 0
    assert _mode(report) == 0o644
    os.umask(0o027)
    write_atomically(report, "replaced")  # a replaced report is a new file: the umask of now
    assert (_mode(report), report.read_text()) == (0o640, "replaced")
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.usefixtures("umask")
def test_a_failed_write_keeps_the_old_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = tmp_path / "r.json"
    write_atomically(report, "old")

    def fail(*_args: object) -> None:
        raise KeyboardInterrupt  # an interruption mid-write is no different from a full disk

    monkeypatch.setattr("os.replace", fail)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(report, "new")
    assert report.read_text() == "old" and _mode(report) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# --- 5. exit codes ------------------------------------------------------------------------------


def _record(
    status: Status, message: str = "", arch: str = "mixtral", case: str = "random", check: str = "output"
) -> CheckResult:
    repro = f"moeconf check --arch {arch} --backend zero3 --dtype fp32 --device cpu --case {case} --check {check}"
    return CheckResult(arch, "zero3", "fp32", "cpu", case, check, status, None, None, None, None, message, repro)


@pytest.mark.parametrize(
    ("statuses", "code"),
    [
        (["pass", "xfail", "skip"], 0),
        (["pass", "fail"], 1),
        (["pass", "error", "setup"], 1),
        (["pass", "setup"], 2),
        (["skip", "skip"], 2),
        ([], 2),
    ],
)
def test_exit_rule(statuses: list[Status], code: int) -> None:
    assert exit_status([_record(s) for s in statuses]) == code


def test_an_environment_fault_is_not_green_in_junit() -> None:
    from xml.etree import ElementTree as ET

    suite = ET.fromstring(to_junit([_record("pass"), _record("setup", "environment: no free port")]))
    assert suite.get("errors") == "1"
    (error,) = suite.findall("testcase/error")
    assert error.get("type") == "environment" and error.get("message") == "environment: no free port"
    assert json.loads(to_json([_record("pass"), _record("setup")]))["summary"]["ok"] is False


def test_an_environment_fault_exits_2_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", *ONE_CASE, "--backend", f"{DOOR}:EnvironmentBroken", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("moeconf: environment: the DeepSpeed op build lock /tmp/ds/lock is stale")
    assert "not the code under test" in line
    assert "not judged: the environment failed, not the code under test" in out


# --- 6. multi-rank evidence in the text report --------------------------------------------------


def _rank_failure_message() -> str:
    stack = "\n".join(f'  File "deepspeed/runtime/zero/stage3.py", line {i}, in fetch_sub_module' for i in range(2500))
    result = MultiRankResult(
        status="deadlock",
        outcomes=[
            RankOutcome(0, exitcode=-9, signal="SIGKILL", stack=f"RANK0-STACK\n{stack}", killed_by_launcher=True),
            RankOutcome(1, exitcode=-9, signal="SIGKILL", stack=f"RANK1-STACK\n{stack}", killed_by_launcher=True),
        ],
        elapsed_s=120.0,
        world_size=2,
        deadline_s=120.0,
        fn="moeconf.backends.rank_job:run_job",
        message="deadline of 120s passed with ranks [0, 1] still running",
    )
    return "hang: ranks [0, 1] still running after 120 s (every rank's stack on no_hang)\n" + result.report()


def _multi_rank_records() -> list[CheckResult]:
    """What the engine makes of one hung zero3 session: the evidence once (on no_hang), one-line
    summaries on every other record."""
    full = _rank_failure_message()
    summary = full.splitlines()[0]
    checks = ["routing", "routing_weights", "output", "aux_loss", "grad_input", "grad_router", "grad_experts"]
    records = [
        _record("fail", summary, arch, case, check)
        for arch in ("qwen3_moe",)
        for case in ("random", "single_token", "empty_expert", "one_expert")
        for check in checks
    ]
    records.append(_record("fail", full, "qwen3_moe", "adversarial_steps", "no_hang"))
    records += [
        _record("fail", summary, "qwen3_moe", "adversarial_steps", c)
        for c in ("partition_output", "partition_grads", "partition_zero_grads", "partition_params")
    ]
    return records


def test_multi_rank_evidence_is_cut_in_text_and_whole_in_json() -> None:
    records = _multi_rank_records()
    text = to_text(records)
    lines = text.splitlines()
    assert len(lines) <= 200, len(lines)
    assert "RANK0-STACK" in text and "RANK1-STACK" not in text  # the first failing rank's section only
    assert sum(1 for line in lines if line.startswith("- FAIL")) == 1  # one cause
    assert FULL_EVIDENCE_NOTE in text
    evidence = [line for line in lines if line.startswith("    ")]
    assert len(evidence) <= EVIDENCE_LINES + 1
    assert sum(1 for line in lines if line.startswith("  repro: ")) == 5  # one per case
    for rendered in (to_json(records), to_junit(records)):
        assert rendered.count("RANK0-STACK") == 1 and rendered.count("RANK1-STACK") == 1
    assert json.loads(to_json(records))["summary"]["fail"] == len(records)


# --- 7. causes and skip reasons in the text report ----------------------------------------------


def test_identical_failures_collapse_to_one_cause_with_a_repro_per_case(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--arch", "mixtral", "qwen2_moe", "--config", "tiny", "--case", "random", "single_token"]
    assert main(["check", *args, "--backend", f"{DOOR}:RaisesImportError", "--quiet"]) == 1
    out = capsys.readouterr().out
    causes = [line for line in out.splitlines() if line.startswith("- ERROR")]
    assert len(causes) == 1 and "ImportError: No module named 'fused_moe_kernel'" in causes[0]
    repros = [line for line in out.splitlines() if line.startswith("  repro: ")]
    assert len(repros) == 4  # (mixtral, qwen2_moe) x (random, single_token)
    assert not any("--check" in r for r in repros)  # every check of the case: the repro reruns the case


def test_skip_reasons_are_listed_once_with_counts(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--arch", "dbrx", "mixtral", "--config", "tiny", "--backend", "hf-grouped-mm", "--case", "random"]
    assert main(["check", *args]) == 0
    out, err = capsys.readouterr()
    skip_lines = [line for line in out.splitlines() if line.startswith("- ") and "(hf-grouped-mm)" in line]
    assert len(skip_lines) == 1 and skip_lines[0].startswith("- 8 records (hf-grouped-mm): "), out
    # 8. a start line names each (arch, backend, dtype) before it runs, then the case line.
    lines = err.splitlines()
    assert lines.index(next(x for x in lines if x.split()[:2] == ["mixtral", "hf-grouped-mm"])) < len(lines) - 1
    assert lines[-2].split()[-1] == "..." and lines[-1].split()[:5] == [
        "mixtral",
        "hf-grouped-mm",
        "fp32",
        "cpu",
        "random",
    ]
