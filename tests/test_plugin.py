"""The pytest plugin, as a downstream repository uses it: a few-line test file, parametrised at
collection, red with moeconf's messages and repro lines, narrowed from the command line."""

from __future__ import annotations

import pytest

from moeconf import pytest_plugin
from moeconf.cli import main

pytest_plugins = ["pytester"]

PARITY_FILE = """
from moeconf.pytest_plugin import parity_tests

test_moe = parity_tests(backend={backend!r}, archs={archs!r}, cases=["random"])
"""
FIXTURE_FILE = """
def test_moe(moeconf_case):
    moeconf_case.check()
"""
OPTIONS = ("-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:randomly")


@pytest.fixture(scope="module", autouse=True)
def _imported_before_the_inner_runs() -> None:
    """NOTE: an in-process pytester run drops, when it ends, every module imported during it; torch
    and transformers modules do not survive a second import (operator libraries register once per
    process). So what the inner runs import is imported here first, by running the same checks."""
    import tests.test_outside_registry  # noqa: F401

    argv = ["check", "--arch", "mixtral", "qwen2_moe", "--backend", "tests.seeded:gate_up_swapped", "hf-eager"]
    main([*argv, "--case", "random", "--quiet"])


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # NOTE: in-process, so the inner run imports this checkout's tests.* modules and shares the
    # already imported torch/transformers (a subprocess would take seconds per run).
    return pytester.runpytest_inprocess(*OPTIONS, *args)


def test_the_plugin_is_installed_and_leaves_other_tests_alone(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.has_plugin("moeconf.pytest_plugin")
    assert pytestconfig.getoption("moeconf_backend") == []  # no clash with moeconf's own conftest


def test_a_correct_backend_is_green_one_test_per_arch_backend_dtype(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(PARITY_FILE.format(backend="hf-eager", archs=["mixtral", "qwen2_moe"]))
    result = _run(pytester, "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["*test_moe?mixtral-hf-eager-fp32? PASSED*", "*test_moe?qwen2_moe-hf-eager-fp32? PASSED*"]
    )


def test_a_seeded_bug_is_red_with_moeconfs_message_and_repro(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(PARITY_FILE.format(backend="tests.seeded:gate_up_swapped", archs=["mixtral"]))
    result = _run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*fail random/output: output*got*expected*",
            (
                "*repro: moeconf check --arch mixtral --config tiny --backend tests.seeded:gate_up_swapped --dtype fp32 --device cpu "
                "--case random --check output --seed 0"
            ),
        ]
    )


def test_options_replace_the_files_matrix_and_add_registries(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(FIXTURE_FILE)
    registry = "tests.test_outside_registry:ARCHITECTURES"
    result = _run(pytester, "-v", "--moeconf-registry", registry, "--moeconf-backend", "tests.seeded:gate_up_swapped")
    result.assert_outcomes(failed=2)  # default archs: the registry's own entries
    result.stdout.fnmatch_lines([f"*repro: moeconf --registry {registry} check --arch outside_mixtral *"])
    narrowed = _run(pytester, "-v", "--moeconf-registry", registry, "--moeconf-arch", "outside_qwen3_moe")
    narrowed.assert_outcomes(passed=1)


def test_markers_select_by_suite_and_device(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(PARITY_FILE.format(backend="hf-eager", archs=["mixtral"]))
    _run(pytester, "-m", "parity and cpu", "--co").assert_outcomes()
    assert "1 test collected" in str(_run(pytester, "-m", "parity and cpu", "--co").stdout)
    assert "1 deselected" in str(_run(pytester, "-m", "partition or cuda", "--co").stdout)
    assert "--strict-markers" and _run(pytester, "--strict-markers", "--co").ret == 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--moeconf-registry", "no_such_module_xyz:E"), "No module named 'no_such_module_xyz'"),
        (("--moeconf-registry", "tests.test_outside_registry:CLASHING"), "'mixtral' is a built-in"),
        (("--moeconf-backend", "no-such"), "unknown backend 'no-such'"),
        (("--moeconf-dtype", "fp64"), "unknown dtype 'fp64'"),
        (("--moeconf-device", "tpu"), "unknown device 'tpu'"),
    ],
)
def test_a_bad_option_is_a_one_line_usage_error(
    pytester: pytest.Pytester, args: tuple[str, ...], expected: str
) -> None:
    pytester.makepyfile(FIXTURE_FILE)
    result = _run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if line.startswith("ERROR:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr.lines


def test_an_unknown_architecture_is_one_line_where_it_is_asked_for(pytester: pytest.Pytester) -> None:
    # Checked at collection: a test file may register the name itself (registry=...).
    pytester.makepyfile(PARITY_FILE.format(backend="hf-eager", archs=["nope"]))
    result = _run(pytester)
    assert result.ret == pytest.ExitCode.INTERRUPTED  # a collection error
    result.stdout.fnmatch_lines(["*moeconf: unknown architecture 'nope'; registered: *"])
    assert "Traceback" not in result.stdout.str() and "pytest_plugin.py" not in result.stdout.str()


def test_a_case_reruns_as_one_moeconf_check_line() -> None:
    case = pytest_plugin.MoeconfCase("outside_mixtral", "b", "bf16", "cpu", False, program="moeconf --registry m:A")
    assert (
        case.repro()
        == "moeconf --registry m:A check --arch outside_mixtral --backend b --dtype bf16 --device cpu --seed 0"
    )
    assert case.selection().archs == ("outside_mixtral",)
