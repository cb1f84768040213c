"""The emulator's rejections name the caller's line (issue 14, item 1).

A real torch_npu op is native code, so its rejection's traceback ends at the line that called it; the
emulator's raise sits frames deeper. ``tests/npu/outside_caller.py`` plays a framework's kernel module.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from moeconf.harness.engine import Selection, run_selection
from moeconf.npu import NpuOpRejected
from tests.npu import outside_caller
from tests.npu.outside_caller import LINES

CALLER = "tests/npu/outside_caller.py"

DIRECT: list[tuple[str, Callable[[], object], str, str]] = [
    (
        "swiglu",
        lambda: outside_caller.swiglu_on_a_transposed_view(torch.randn(4, 6)),
        "swiglu_on_a_transposed_view",
        "x",
    ),
    (
        "permute",
        lambda: outside_caller.permute_with_float_ids(torch.randn(3, 4), torch.zeros(3, 2, dtype=torch.int64)),
        "permute_with_float_ids",
        "indices",
    ),
    # through grouped_matmul_autograd (moeconf.npu) and torch.autograd.Function.apply: both skipped
    (
        "gmm",
        lambda: outside_caller.grouped_matmul_with_wrong_counts(torch.randn(4, 3), torch.randn(2, 3, 5)),
        "grouped_matmul_with_wrong_counts",
        "group_list",
    ),
]


@pytest.mark.parametrize(("line", "call", "function", "argument"), DIRECT, ids=[d[0] for d in DIRECT])
def test_rejection_names_the_callers_file_and_line(
    line: str, call: Callable[[], object], function: str, argument: str
) -> None:
    with pytest.raises(ValueError) as info:  # still a ValueError: existing `except ValueError` keeps working
        call()
    exc = info.value
    assert isinstance(exc, NpuOpRejected)
    message = str(exc)
    assert "\n" not in message
    assert exc.call_site == f"{CALLER}:{LINES[line]}", message
    assert message.endswith(f"(called at {CALLER}:{LINES[line]} in {function})"), message
    assert f"'{argument}'" in message and exc.argument == argument
    assert "emulator.py" not in message


def test_backward_rejection_names_the_line_that_called_the_forward() -> None:
    x, weight = torch.randn(4, 3, requires_grad=True), torch.randn(2, 3, 5, requires_grad=True)
    with pytest.raises(NpuOpRejected) as info:
        outside_caller.fp32_grouped_matmul_backward_under_6_0_rules(x, weight)
    message = str(info.value)
    assert info.value.call_site == f"{CALLER}:{LINES['gmm-forward']}", message
    assert "in fp32_grouped_matmul_backward_under_6_0_rules, in its backward)" in message
    # The backward's bookkeeping is gone afterwards: a later forward rejection names its own line again.
    with pytest.raises(NpuOpRejected) as again:
        outside_caller.swiglu_on_a_transposed_view(torch.randn(4, 6))
    assert again.value.call_site == f"{CALLER}:{LINES['swiglu']}"


def test_record_of_a_rejecting_kernel_names_the_kernels_line_not_the_emulators() -> None:
    sel = Selection(archs=("mixtral",), backends=("tests.npu.outside_caller:MY_KERNEL",), cases=("random",))
    records = [r for group in run_selection(sel) for r in group]
    assert records and all(r.status == "error" for r in records)
    where = f"(called at {CALLER}:{LINES['kernel']} in expert_mlp)"
    for r in records:
        assert r.message.startswith("backend raised NpuOpRejected: npu_swiglu(): 'x' must be contiguous"), r.message
        assert r.message.endswith(where), r.message  # no second, emulator-side location after it
        assert "emulator.py" not in r.message
