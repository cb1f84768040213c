"""The conformance test is not green by construction: with the planted bug (routing weights not
permuted with their rows) it goes red, with moeconf's message and the line that reruns the record."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parents[1]

BROKEN = """
from moeconf.pytest_plugin import parity_tests

test_moe_parity = parity_tests(
    backend="tinyframework.moe:GROUPED_WRONG_WEIGHTS",
    registry="tinyframework.moe:ARCHITECTURES",
    archs=["tinyframework_moe", "mixtral"],
    cases=["random"],
)
"""


def test_wrong_weighting_is_red_with_a_repro_line(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(BROKEN)
    # NOTE: a subprocess: an in-process run would drop the torch/transformers modules it imported
    # when it ends, and they cannot be imported twice in one process.
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "moeconf.pytest_plugin")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*fail random/output: output*got*expected*",
            (
                "*repro: moeconf --registry tinyframework.moe:ARCHITECTURES check --arch tinyframework_moe "
                "--config tiny --backend tinyframework.moe:GROUPED_WRONG_WEIGHTS --dtype fp32 --device cpu "
                "--case random --check output --seed 0"
            ),
            "*repro: moeconf check --arch mixtral --config tiny --backend tinyframework.moe:GROUPED_WRONG_WEIGHTS "
            "*--check output *",
        ]
    )
    # The routing is the block's own and stays right: only what the kernel computes goes red.
    assert "random/routing:" not in result.stdout.str()
