"""The bench's own tests: counts by hand, routing histograms, the regression gate, the report schema, the
correctness precondition, budgets, and a smoke run. No speed is asserted anywhere."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moeconf.bench.cli import main
from moeconf.bench.compare import compare, judge, load_report
from moeconf.bench.flops import forward_flops, pass_bytes, pass_flops
from moeconf.bench.memory import PeakMemory
from moeconf.bench.presets import PRESETS, check_sized_entry, preset_sizes, sized_entry
from moeconf.bench.report import to_json, write_atomically
from moeconf.bench.routing import (
    IMPOSED,
    RoutingError,
    expert_loads,
    expert_shares,
    imposed_routing,
)
from moeconf.bench.rows import KEY_FIELDS, BenchRow
from moeconf.bench.timing import MIN_TIMED_SAMPLES, measure, plan_runs
from moeconf.registry import get_entry
from moeconf.spec import ExpertSpec, MoESpec, SharedSpec

ROOT = Path(__file__).resolve().parents[1]
RESULT_FIELDS = {
    "arch",
    "backend",
    "preset",
    "dtype",
    "device",
    "pass",
    "routing",
    "tokens",
    "status",
    "median_s",
    "iqr_s",
    "tokens_per_s",
    "flops",
    "achieved_flops_per_s",
    "bytes",
    "achieved_bytes_per_s",
    "limit_s",
    "ratio_to_limit",
    "peak_mem_bytes",
    "message",
    "repro",
    "level",
}
ENVIRONMENT_FIELDS = {
    "torch",
    "transformers",
    "deepspeed",
    "device",
    "device_name",
    "threads",
    "cpu_model",
    "git_revision",
}


# --- FLOPs and bytes, counted by hand ---------------------------------------------------------------


def test_flops_of_a_mixtral_like_layer_by_hand() -> None:
    spec = MoESpec(num_experts=8, top_k=2, hidden=32, intermediate=24)
    # router 2·N·H·E = 2·10·32·8; routed N·k·3·2·H·I = 10·2·3·2·32·24
    assert forward_flops(spec, 10).router == 5_120
    assert forward_flops(spec, 10).routed == 92_160
    assert pass_flops(spec, 10, "fwd") == 97_280
    assert pass_flops(spec, 10, "fwdbwd") == 3 * 97_280  # backward = input grads + weight grads = 2x forward
    assert pass_flops(spec, 10, "fwd", "experts") == 92_160  # the experts call alone: no router
    assert pass_flops(get_entry("mixtral").spec, 10, "fwd") == 97_280  # the registry's tiny mixtral is this spec


def test_flops_with_gated_shared_experts_and_backward_by_hand() -> None:
    spec = MoESpec(num_experts=8, top_k=2, hidden=32, intermediate=24, shared=SharedSpec(16, gate="sigmoid"))
    # shared: N·3·2·H·S = 10·3·2·32·16 = 30720, its sigmoid gate 2·N·H = 640
    assert forward_flops(spec, 10).shared == 31_360
    assert pass_flops(spec, 10, "fwd") == 5_120 + 92_160 + 31_360
    assert pass_flops(spec, 10, "fwdbwd") == 3 * 128_640 == 385_920
    assert pass_flops(spec, 10, "fwdbwd", "experts") == 3 * 92_160
    assert pass_flops(get_entry("qwen2_moe").spec, 10, "fwdbwd") == 385_920
    non_gated = MoESpec(8, 2, 32, 24, experts=ExpertSpec(activation="relu2", glu="none"))
    assert forward_flops(non_gated, 10).routed == 10 * 2 * 2 * 2 * 32 * 24  # up + down only


def test_bytes_count_touched_experts_once_and_grads_in_backward() -> None:
    spec = MoESpec(num_experts=8, top_k=2, hidden=32, intermediate=24)
    fwd = pass_bytes(spec, tokens=10, touched_experts=5, pass_="fwd", level="block", element_bytes=4)
    assert fwd.weights == (5 * 3 * 32 * 24 + 8 * 32) * 4 == 47_104  # touched experts + router
    assert fwd.activations == 2 * 10 * 32 * 4  # input read, output written
    assert fwd.weight_grads == 0
    both = pass_bytes(spec, 10, 5, "fwdbwd", "block", 4)
    assert both.activations == 4 * 10 * 32 * 4 and both.weight_grads == 47_104
    assert both.total == 47_104 + 5_120 + 47_104
    experts = pass_bytes(spec, 10, 5, "fwd", "experts", 2)
    assert experts.weights == 5 * 3 * 32 * 24 * 2  # no router at the experts call
    assert experts.activations == 2 * 10 * 32 * 2 + 10 * 2 * (8 + 2)  # + index (int64) and weights


# --- routing distributions ---------------------------------------------------------------------------


@pytest.mark.parametrize("routing", IMPOSED)
@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(1, 128, 8), (37, 16, 2), (2000, 16, 2), (64, 128, 8)])
def test_realised_histogram_is_the_requested_loads(routing: str, tokens: int, experts: int, top_k: int) -> None:
    index, weights = imposed_routing(routing, tokens, experts, top_k, torch.float32, "cpu", seed=3)  # type: ignore[arg-type]
    loads = expert_loads(routing, tokens, experts, top_k, seed=3)  # type: ignore[arg-type]
    assert index.shape == (tokens, top_k) and index.dtype == torch.int64
    assert torch.equal(torch.bincount(index.reshape(-1), minlength=experts), loads)
    assert all(len(set(row.tolist())) == top_k for row in index), "a token picked an expert twice"
    assert int(loads.sum()) == tokens * top_k and int(loads.max()) <= tokens
    torch.testing.assert_close(weights.sum(-1), torch.ones(tokens))


def test_uniform_and_sparse_loads() -> None:
    uniform = expert_loads("uniform", 1000, 16, 2)
    assert int(uniform.max() - uniform.min()) <= 1
    sparse = expert_loads("sparse", 1000, 16, 2)
    assert int((sparse == 0).sum()) == 16 // 4
    active = sparse[sparse > 0]
    assert int(active.max() - active.min()) <= 1


def test_hot_expert_gets_half_the_tokens() -> None:
    loads = expert_loads("hot", 1001, 16, 2)
    assert int(loads.max()) == math.ceil(1001 / 2)
    others = loads[loads != loads.max()]
    assert int(others.max() - others.min()) <= 1


def test_zipf_loads_follow_rank_power_law() -> None:
    tokens, experts, top_k, seed = 4000, 16, 2, 5
    loads = expert_loads("zipf", tokens, experts, top_k, seed).double()
    shares = expert_shares("zipf", experts, torch.Generator().manual_seed(seed))
    assert float((loads - tokens * top_k * shares).abs().max()) <= 1.0  # apportioned exactly (largest remainder)
    ranked = loads.sort(descending=True).values
    slope = torch.linalg.lstsq(
        torch.stack([torch.log(torch.arange(1, experts + 1).double()), torch.ones(experts, dtype=torch.float64)], 1),
        torch.log(ranked).unsqueeze(1),
    ).solution[0, 0]
    assert abs(float(slope) + 1.2) < 0.02


def test_impossible_distribution_is_refused() -> None:
    with pytest.raises(RoutingError):
        expert_loads("sparse", 10, 4, 4)  # 3 active experts cannot take 4 distinct slots per token


# --- the regression gate -----------------------------------------------------------------------------


def _row(median: float | None, iqr: float | None, **key: object) -> dict[str, object]:
    row = {k: "x" for k in KEY_FIELDS} | {"tokens": 32, "status": "timed", "median_s": median, "iqr_s": iqr}
    return row | key


def test_a_baseline_twice_as_fast_is_a_regression_and_an_equal_one_is_not() -> None:
    current = [_row(0.010, 0.0002)]
    slower = compare(current, [_row(0.005, 0.0001)], threshold=0.1)
    assert len(slower.regressions) == 1 and slower.regressions[0].slowdown == pytest.approx(1.0)
    assert "REGRESSION" in "\n".join(slower.lines())
    assert compare(current, [_row(0.010, 0.0002)], threshold=0.1).regressions == []


def test_noise_widens_the_threshold() -> None:
    base, quiet, noisy = _row(0.010, 0.0001), _row(0.012, 0.0001), _row(0.012, 0.0040)
    assert judge(("k",), base, quiet, 0.1).regressed  # +20 % with 1 % noise: slower
    verdict = judge(("k",), base, noisy, 0.1)
    assert verdict.noise == pytest.approx((0.0001 + 0.0040) / (2 * 0.010))
    assert not verdict.regressed  # +20 % is inside 20.5 % of spread
    assert judge(("k",), _row(0.005, 0.002), _row(0.010, 0.004), 0.1).regressed  # 2x beyond 40 % IQRs


def test_unmatched_and_unmeasured_rows_are_listed_and_environment_differences_warned() -> None:
    comparison = compare(
        [_row(0.01, 0.0, tokens=1), _row(None, None, tokens=2, status="over_budget")],  # type: ignore[arg-type]
        [_row(0.01, 0.0, tokens=2)],
        current_env={"threads": 2, "torch": "2.13"},
        baseline_env={"threads": 1, "torch": "2.13"},
    )
    assert comparison.verdicts == [] and len(comparison.not_compared) == 2
    assert comparison.environment_warnings == ["threads: 1 (baseline) vs 2"]


def test_a_figure_now_over_budget_is_judged_on_what_it_measured() -> None:
    comparison = compare([_row(0.5, 0.0, status="over_budget")], [_row(0.01, 0.0)])
    assert len(comparison.regressions) == 1


# --- report, files ------------------------------------------------------------------------------------


def test_report_json_schema_and_round_trip(tmp_path: Path) -> None:
    row = BenchRow("mixtral", "hf-eager", "tiny", "fp32", "cpu", "fwd", "natural", 8, "timed", level="block")
    row.with_measurements(0.002, flops=1000, nbytes=4000, limit_s=0.001)
    row.iqr_s = 0.0001
    doc = json.loads(to_json([row], {"device": "cpu"}))
    assert set(doc) >= {"environment", "results", "summary"}
    assert RESULT_FIELDS <= set(doc["results"][0])
    assert doc["results"][0]["ratio_to_limit"] == pytest.approx(0.5)
    assert doc["results"][0]["tokens_per_s"] == pytest.approx(4000)
    assert BenchRow.from_dict(doc["results"][0]) == row
    path = tmp_path / "r.json"
    path.write_text(to_json([row], {"device": "cpu"}))
    env, results = load_report(path)
    assert env == {"device": "cpu"} and results[0]["pass"] == "fwd"


def test_reports_are_written_whole_with_the_umask_mode(tmp_path: Path) -> None:
    path = tmp_path / "report.txt"
    write_atomically(path, "hello\n")
    assert path.read_text() == "hello\n"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in path.parent.iterdir()] == ["report.txt"]  # no temp file left


def test_plots_are_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from moeconf.bench.plot import write_plots

    rows = []
    for backend in ("hf-eager", "grouped-mm"):
        for tokens in (1, 8):
            row = BenchRow("qwen3_moe", backend, "tiny", "fp32", "cpu", "fwd", "natural", tokens, "timed")
            row.with_measurements(0.001 * tokens, 100, 100, 0.0005)
            row.peak_mem_bytes = 2**20 * tokens
            rows.append(row)
    written = write_plots(rows, tmp_path)
    assert sorted(p.name for p in written) == ["memory.png", "ratio_to_limit.png", "throughput.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


# --- presets ------------------------------------------------------------------------------------------


def test_presets_resize_the_registry_block() -> None:
    qwen = PRESETS["qwen3-30b-a3b"]
    assert (qwen.hidden, qwen.intermediate, qwen.num_experts, qwen.top_k) == (2048, 768, 128, 8)
    assert all("config.json" in p.source for p in PRESETS.values() if p.name != "tiny")
    entry = get_entry("deepseek_v3")
    sized = sized_entry(entry, preset_sizes(PRESETS["deepseek-v3"], entry.spec, scale=0.125))
    spec = sized.spec
    assert (spec.hidden, spec.intermediate, spec.num_experts, spec.top_k) == (896, 256, 256, 8)
    assert spec.shared is not None and spec.shared.intermediate == 256
    assert spec.router.group_limit is not None and spec.router.group_limit.n_group == 8
    assert spec.router == entry.spec.router.__class__(
        **{**entry.spec.router.__dict__, "group_limit": spec.router.group_limit}
    )
    check_sized_entry(sized)  # every size reached the block (built on the meta device)


# --- timing and memory ---------------------------------------------------------------------------------


def test_budget_caps_the_samples_and_a_hopeless_figure_is_not_run() -> None:
    calls: list[float] = []

    def slow() -> None:
        calls.append(time.perf_counter())
        time.sleep(0.05)

    timing = measure(slow, warmup=1, repeat=50, budget_s=0.3)
    # Cut short but with enough samples for a median and a spread: timed, and says so.
    assert timing.status == "timed" and MIN_TIMED_SAMPLES <= len(timing.samples_s) < 50
    assert len(calls) <= 7 and "samples fit" in timing.message
    calls.clear()
    short = measure(slow, warmup=1, repeat=5, budget_s=0.14)
    assert short.status == "over_budget" and 1 <= len(short.samples_s) < MIN_TIMED_SAMPLES
    assert len(calls) <= 3 and "samples fit" in short.message
    refused = measure(slow, warmup=1, repeat=5, budget_s=1.0, lower_bound_s=5.0)
    assert refused.status == "over_budget" and refused.samples_s == [] and "not run" in refused.message
    assert plan_runs(first_s=0.001, warmup=2, repeat=5, budget_s=10).calls_per_sample == 10


def test_timing_reports_median_and_iqr_per_call() -> None:
    timing = measure(lambda: time.sleep(0.002), warmup=1, repeat=5, budget_s=10)
    assert timing.status == "timed" and len(timing.samples_s) == 5
    assert timing.calls_per_sample >= 1
    assert timing.median_s is not None and timing.median_s >= 0.002 and timing.iqr_s is not None


def test_cpu_peak_memory_sees_a_torch_allocation() -> None:
    with PeakMemory("cpu") as memory:
        block = torch.ones(32 * 2**20 // 4)  # 32 MiB, touched
        del block
    assert memory.peak_bytes is not None and memory.peak_bytes >= 24 * 2**20


# --- the command ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--arch", "no_such_arch"], "no_such_arch"),
        (["--backend", "no-such-backend"], "no-such-backend"),
        (["--preset", "gpt-5"], "gpt-5"),
        (["--tokens", "0"], "--tokens"),
        (["--repeat", "many"], "--repeat"),
        (["--scale", "-1"], "--scale"),
        (["--routing", "chaotic"], "chaotic"),
        (["--arch", "mixtral", "--preset", "qwen3-30b-a3b"], "qwen3_moe"),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]


def _bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "moeconf.bench", *args],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_smoke_tiny_run_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    done = _bench(
        "--preset",
        "tiny",
        "--repeat",
        "1",
        "--backend",
        "hf-eager",
        "grouped-mm",
        "--tokens",
        "4",
        "--routing",
        "natural",
        "hot",
        "--threads",
        "1",
        "--format",
        "json",
        "--output",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    assert ENVIRONMENT_FIELDS <= set(doc["environment"])
    results = doc["results"]
    assert len(results) == 2 * 2 * 2  # backends x passes x routings
    for r in results:
        assert RESULT_FIELDS <= set(r)
        assert r["status"] == "timed", r
        assert r["median_s"] > 0 and r["iqr_s"] >= 0 and r["flops"] > 0 and r["bytes"] > 0
        assert r["ratio_to_limit"] == pytest.approx(r["limit_s"] / r["median_s"])
        assert r["level"] == ("block" if r["routing"] == "natural" else "experts")
        assert r["repro"].startswith("moeconf bench --arch qwen3_moe --backend ")
    assert "[1/8]" in done.stderr  # progress on stderr


def test_a_backend_failing_parity_is_not_timed_with_the_check_named(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    done = _bench(
        "--arch",
        "mixtral",
        "--preset",
        "tiny",
        "--backend",
        "tests.seeded:gate_up_swapped",
        "--tokens",
        "4",
        "--pass",
        "fwd",
        "--repeat",
        "1",
        "--format",
        "json",
        "--output",
        str(out),
    )
    assert done.returncode == 1, done.stderr
    (row,) = json.loads(out.read_text())["results"]
    assert row["status"] == "not_timed" and row["median_s"] is None and row["tokens_per_s"] is None
    assert "output" in row["message"] and "grad_experts" in row["message"]
    assert "moeconf check --arch mixtral --config tiny --backend tests.seeded:gate_up_swapped" in row["message"]
