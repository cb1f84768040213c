"""Issue 14, friction in the reports: one entry per root cause with a count (text), a shared
``root_cause`` id and count (JSON), JUnit per record naming its cause, skip reasons with counts in the
text report, and an outside backend shown by its name (its import path kept in every repro).
(Item 1, emulator rejections located at the caller's line: tests/npu/test_call_site.py.)"""

from __future__ import annotations

import json
import shlex
from xml.etree import ElementTree as ET

import pytest

import tests.npu.outside_caller  # imported, as a run would have: its backend's name is known
from moeconf.cli import main
from moeconf.harness.engine import CheckResult
from moeconf.harness.report import display_name, progress_line, to_json, to_junit, to_text
from moeconf.harness.status import Status

KERNEL = "tests.npu.outside_caller:MY_KERNEL"
CHECKS = ("routing", "output", "grad_input")
RAISED = "backend raised ImportError: No module named 'fused_moe_kernel' at kernel.py:64"


def _record(
    status: Status,
    message: str,
    arch: str = "mixtral",
    case: str = "random",
    check: str = "output",
    backend: str = KERNEL,
) -> CheckResult:
    repro = shlex.join(
        ["moeconf", "check", "--arch", arch, "--backend", backend, "--dtype", "fp32", "--device", "cpu"]
        + ["--case", case, "--check", check, "--seed", "0"]
    )
    return CheckResult(arch, backend, "fp32", "cpu", case, check, status, None, None, None, None, message, repro)


def _one_cause_everywhere() -> list[CheckResult]:
    """One backend that raises the same exception on every case: 2 archs x 2 cases x 3 checks."""
    return [
        _record("error", RAISED, arch, case, check)
        for arch in ("mixtral", "qwen2_moe")
        for case in ("random", "single_token")
        for check in CHECKS
    ]


def test_one_root_cause_is_one_text_line_with_its_count_and_cases() -> None:
    records = [*_one_cause_everywhere(), _record("pass", "", check="aux_loss", backend="hf-eager")]
    lines = to_text(records).splitlines()
    heads = [line for line in lines if line.startswith("- ERROR")]
    cause = json.loads(to_json(records))["root_causes"][0]["id"]
    scope = "4 cases: mixtral random, single_token; qwen2_moe random, single_token; my-kernel fp32 cpu; 3 checks"
    assert heads == [f"- ERROR ×12 ({scope}) [{cause}]: {RAISED}"]
    assert "12 failing record(s), 1 distinct cause(s):" in lines
    repros = [line for line in lines if line.startswith("  repro: ")]
    assert len(repros) == 4 and all(f"--backend {KERNEL}" in r for r in repros)  # one per case, import path kept


def test_a_timeouts_evidence_record_and_its_pointers_are_one_cause() -> None:
    stuck = "backend timed out: no answer after 5 s (--timeout); stopped"
    records = [
        _record("error", f"{stuck}; it was at:\n  File 'k.py', line 3, in run\n    spin()", case=case, check="routing")
        for case in ("random", "single_token")
    ] + [
        _record("error", f"{stuck} (stack on the routing record)", case=case, check=check)
        for case in ("random", "single_token")
        for check in ("output", "grad_input")
    ]
    text = to_text(records)
    heads = [line for line in text.splitlines() if line.startswith("- ERROR")]
    assert len(heads) == 1 and heads[0].startswith("- ERROR ×6 (2 cases: ") and heads[0].endswith(f": {stuck}")
    assert "    File 'k.py', line 3, in run" in text  # the evidence is still shown once


def test_json_gives_every_record_a_shared_root_cause_and_keeps_the_schema() -> None:
    other = _record("error", "backend raised RuntimeError: boom at k.py:3", arch="olmoe")
    passed = _record("pass", "", arch="olmoe", check="routing")
    skipped = _record("skip", "my-kernel does not run bf16", arch="olmoe", check="grad_input")
    records = [*_one_cause_everywhere(), other, passed, skipped]
    doc = json.loads(to_json(records))
    results = doc["results"]
    assert len(results) == len(records)  # every record kept
    for r, rec in zip(results, records):
        assert {k: r[k] for k in rec.to_dict()} == rec.to_dict()  # the existing fields, unchanged
    ids = {r["root_cause"] for r in results[:12]}
    assert len(ids) == 1 and all(r["root_cause_count"] == 12 for r in results[:12])
    assert results[12]["root_cause"] not in ids and results[12]["root_cause_count"] == 1
    assert results[13]["root_cause"] is None and results[14]["root_cause"] is None  # pass, skip: no cause
    assert [(c["id"], c["count"], c["cases"], c["headline"]) for c in doc["root_causes"]] == [
        (ids.pop(), 12, 4, RAISED),
        (results[12]["root_cause"], 1, 1, "backend raised RuntimeError: boom at k.py:3"),
    ]
    assert set(doc["summary"]) >= {"pass", "fail", "xfail", "skip", "error", "setup", "total", "ok"}
    # Stable: the same cause has the same id in another run (another order, other records around it).
    again = json.loads(to_json([records[5], records[0]]))
    assert again["results"][0]["root_cause"] == results[0]["root_cause"]


def test_junit_keeps_one_testcase_per_record_and_names_the_shared_cause() -> None:
    records = _one_cause_everywhere()
    suite = ET.fromstring(to_junit(records))
    cases = suite.findall("testcase")
    assert len(cases) == len(records) and suite.get("errors") == str(len(records))
    cause = json.loads(to_json(records))["root_causes"][0]["id"]
    for case in cases:
        error = case.find("error")
        assert error is not None and error.get("message") == RAISED
        assert f"root cause {cause}: shared by 12 records" in (error.text or "")


def test_skip_reasons_are_a_short_section_with_counts() -> None:
    records = [
        *[_record("skip", "my-kernel does not run bf16", check=c) for c in CHECKS],
        *[
            _record("skip", "no shared experts in this architecture", case=k, check="grad_shared_experts")
            for k in ("random", "single_token")
        ],
        _record("pass", "", check="routing", backend="hf-eager"),
    ]
    lines = to_text(records).splitlines()
    at = lines.index("5 skipped record(s):")
    assert lines[at + 1 : at + 3] == [
        "- 3 records (my-kernel): my-kernel does not run bf16",
        "- 2 records (my-kernel): no shared experts in this architecture",
    ]


def test_outside_backend_is_shown_by_name_and_its_path_stays_in_the_repro() -> None:
    records = [_record("error", RAISED), _record("pass", "", check="routing", backend="hf-eager")]
    text = to_text(records)
    table = text.split("\n\n")[0].splitlines()
    assert table[1].split()[:2] == ["mixtral", "my-kernel"] and KERNEL not in table[1]
    assert f"(my-kernel = --backend {KERNEL})" in table
    assert "- ERROR mixtral my-kernel fp32 cpu case=random check=output: " in text
    assert f"  repro: moeconf check --arch mixtral --backend {KERNEL} " in text
    assert progress_line([records[0]]).split()[:2] == ["mixtral", "my-kernel"]


@pytest.mark.parametrize(
    "backend",
    [
        "hf-eager",  # a built-in name is a name already
        "not_imported_anywhere.module:BACKEND",  # never imported by a report
        "tests.npu.outside_caller:NO_SUCH_ATTR",
        "tests.npu.outside_caller:LINES",  # no name
    ],
)
def test_a_backend_without_a_known_name_keeps_its_path(backend: str) -> None:
    assert display_name(backend) == backend
    assert f"mixtral {backend} " in to_text([_record("error", RAISED, backend=backend)])


def test_two_backends_with_one_name_keep_their_paths() -> None:
    twin = "tests.npu.outside_caller:MY_KERNEL_TWIN"
    tests.npu.outside_caller.MY_KERNEL_TWIN = tests.npu.outside_caller.MY_KERNEL  # type: ignore[attr-defined]
    try:
        text = to_text([_record("error", RAISED), _record("error", RAISED, backend=twin)])
    finally:
        del tests.npu.outside_caller.MY_KERNEL_TWIN  # type: ignore[attr-defined]
    assert f"mixtral {KERNEL} " in text and f"mixtral {twin}" in text and "my-kernel =" not in text


def test_cli_report_of_a_kernel_raising_on_every_case(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "check",
        "--arch",
        "mixtral",
        "--config",
        "tiny",
        "--case",
        "random",
        "single_token",
        "--backend",
        KERNEL,
        "--quiet",
    ]
    assert main(argv) == 1
    out = capsys.readouterr().out
    heads = [line for line in out.splitlines() if line.startswith("- ERROR")]
    line = tests.npu.outside_caller.LINES["kernel"]
    assert len(heads) == 1 and heads[0].startswith("- ERROR ×16 (2 cases: mixtral random, single_token; my-kernel")
    assert heads[0].endswith(f"(called at tests/npu/outside_caller.py:{line} in expert_mlp)"), heads[0]
    assert out.splitlines()[1].split()[:2] == ["mixtral", "my-kernel"]
    assert all(f"--backend {KERNEL}" in r for r in out.splitlines() if r.startswith("  repro: "))
