"""The command line: exit codes, report formats, repro commands, atomic report files."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from moeconf.cli import main
from moeconf.harness.report import write_atomically
from moeconf.registry import REGISTRY

ONE_CASE = ["--case", "random"]


def test_unknown_arch_is_a_one_line_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--arch", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "mixtral" in err[0]


def test_unknown_backend_is_a_one_line_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--arch", "mixtral", "--backend", "no-such"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hf-eager" in err[0]
    assert main(["check", "--arch", "mixtral", "--backend", "no_such_module:thing"]) == 2


def test_bad_option_value_exits_2() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["check", "--dtype", "fp64"])
    assert exc.value.code == 2


def test_passing_check_exits_0_with_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--arch", "mixtral", "qwen2_moe", *ONE_CASE]) == 0
    out = capsys.readouterr()
    assert "mixtral" in out.out and "pass" in out.out and " 0 fail" in out.out
    assert "random" in out.err  # progress lines while running


def test_failing_check_exits_1_and_json_records_carry_repros(tmp_path: Path) -> None:
    report = tmp_path / "report.json"  # the directory must exist: --output creates no directories
    code = main(
        [
            "check",
            "--arch",
            "mixtral",
            "--backend",
            "tests.seeded:gate_up_swapped",
            *ONE_CASE,
            "--format",
            "json",
            "--output",
            str(report),
            "--quiet",
        ]
    )
    assert code == 1
    data = json.loads(report.read_text())
    keys = {
        "arch",
        "backend",
        "dtype",
        "device",
        "check",
        "status",
        "max_abs_err",
        "max_rel_err",
        "atol",
        "rtol",
        "message",
        "repro",
    }
    assert all(keys <= set(r) for r in data["results"])
    assert data["summary"]["fail"] > 0 and data["summary"]["ok"] is False
    failed = next(r for r in data["results"] if r["check"] == "output")
    assert failed["status"] == "fail" and failed["max_abs_err"] > failed["atol"]

    # The repro reruns exactly that record, with the same verdict.
    argv = shlex.split(failed["repro"])
    assert argv[:2] == ["moeconf", "check"]
    assert main([*argv[1:], "--format", "json", "--output", str(tmp_path / "one.json"), "--quiet"]) == 1
    (only,) = json.loads((tmp_path / "one.json").read_text())["results"]
    assert (only["check"], only["status"], only["max_abs_err"]) == ("output", "fail", failed["max_abs_err"])


def test_junit_report(tmp_path: Path) -> None:
    path = tmp_path / "r.xml"
    assert (
        main(
            [
                "check",
                "--arch",
                "mixtral",
                "--backend",
                "tests.seeded:aux_from_probs",
                *ONE_CASE,
                "--format",
                "junit",
                "--output",
                str(path),
                "--quiet",
            ]
        )
        == 1
    )
    suite = ET.parse(path).getroot()
    failures = suite.findall("testcase/failure")
    assert int(suite.get("failures")) == len(failures) > 0
    assert any("aux_loss" in tc.get("name") for tc in suite.findall("testcase") if tc.find("failure") is not None)


def test_list_json_covers_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["architectures"]
    from moeconf.tools.coverage import DECLARED_UNSUPPORTED

    assert {r["model_type"] for r in rows} == set(REGISTRY) | set(DECLARED_UNSUPPORTED)
    assert len(rows) >= 95
    assert all(
        r["backends"]["hf-eager"]["status"] == "unsupported" and r["backends"]["hf-eager"]["reason"]
        for r in rows
        if r["model_type"] in DECLARED_UNSUPPORTED
    )
    dbrx = next(r for r in rows if r["model_type"] == "dbrx")
    assert dbrx["backends"]["hf-grouped-mm"]["status"] == "unsupported" and dbrx["backends"]["hf-grouped-mm"]["reason"]


def test_python_dash_m_and_console_script_agree() -> None:
    for cmd in ([sys.executable, "-m", "moeconf"], [str(Path(sys.executable).with_name("moeconf"))]):
        if not Path(cmd[0]).exists():
            continue
        done = subprocess.run([*cmd, "check", "--arch", "nope"], capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.count("\n") == 1


def test_report_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "r.json"
    write_atomically(target, "old")

    def broken_replace(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", broken_replace)
    with pytest.raises(OSError):
        write_atomically(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind


def test_unwritable_report_path_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["check", "--arch", "mixtral", "--case", "single_token", "--output", "/proc/no/such/r.json", "--quiet"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/proc/no/such/r.json" in err[0]


def test_a_run_where_everything_is_skipped_is_not_green(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--arch", "gpt_oss", "--backend", "npu-gmm", "--case", "random", "--quiet"]) == 2
    assert "nothing was checked" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1", "17", "four"])
def test_world_size_out_of_range_exits_2(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["check", "--arch", "mixtral", "--backend", "zero3-leaf", "--world-size", value])
    assert exc.value.code == 2
    assert "world size" in capsys.readouterr().err


def test_world_size_resizes_multi_rank_backends_only_and_reaches_the_repro() -> None:
    from moeconf.backends import resolve_backend, with_world_size
    from moeconf.harness.engine import Selection, repro_command

    assert with_world_size(resolve_backend("zero3-leaf"), 4).world_size == 4  # type: ignore[attr-defined]
    eager = resolve_backend("hf-eager")
    assert with_world_size(eager, 4) is eager
    sel = Selection(archs=("mixtral",), backends=("zero3-leaf",), world_size=4)
    line = repro_command(sel, "mixtral", "zero3-leaf", "fp32", "adversarial_steps", "no_hang")
    assert shlex.split(line)[-2:] == ["--world-size", "4"]
