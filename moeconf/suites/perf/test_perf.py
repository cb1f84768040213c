"""Perf suite: the bench engine (``moeconf bench``) over a quick preset set on one device.

Every figure must come out ``timed`` with sane numbers (positive, finite, internally consistent: rates
are the counts over the median, ``ratio_to_limit = limit_s / median_s``); nothing is asserted about
speed — speed goals live in the benchmark (``moeconf bench --compare BASELINE.json``), never in timed
tests. Figures a backend cannot run here are ``unsupported`` with their reason and are not failures.

Each test writes its JSON report and PNG plots to ``$MOECONF_PERF_DIR`` (default ``perf-results/``):
``<name>.json`` and ``<name>/{throughput,ratio_to_limit,memory}.png``.

The bench runs in a child process (``python -m moeconf.bench``): the suites sit below ``moeconf.bench``
in moeconf's layering, and a fresh process keeps pytest's own state out of the timings. Environment:
``MOECONF_DEVICE`` (cpu | cuda | npu), ``MOECONF_THREADS`` (CPU threads; the nox session sets 1),
``MOECONF_REQUIRE_DEVICE=1`` (a missing device fails instead of skipping).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from moeconf.suites.run import require_device

DEVICE = os.environ.get("MOECONF_DEVICE", "cpu")
OUT = Path(os.environ.get("MOECONF_PERF_DIR", "perf-results"))
REPEAT = "3"
TIMEOUT_S = 900

pytestmark = [pytest.mark.perf, getattr(pytest.mark, DEVICE)]

# The quick preset sets: name → bench arguments (besides device, repeat, output and plots).
QUICK: dict[str, dict[str, list[str]]] = {
    "cpu": {
        # Every router family's tiny block on every single-process backend, natural and imposed routing.
        "tiny-archs": [
            "--arch",
            "qwen3_moe",
            "deepseek_v3",
            "gpt_oss",
            "qwen2_moe",
            "--preset",
            "tiny",
            "--tokens",
            "1",
            "64",
            "--routing",
            "natural",
            "zipf",
            "--pass",
            "fwd",
            "fwdbwd",
        ],
        # Checkpoint presets at 1/16 width: their expert count and top-k. (deepseek-v3's 256 experts are
        # left out: hf-eager's backward costs O(E^2 H I), which made them most of the run time.)
        "checkpoints-scaled": [
            "--preset",
            "qwen3-30b-a3b",
            "olmoe-1b-7b",
            "gpt-oss-20b",
            "--scale",
            "0.0625",
            "--tokens",
            "16",
            "256",
            "--routing",
            "natural",
            "hot",
            "--pass",
            "fwd",
            "fwdbwd",
        ],
        # Training steps on 2 ranks: the dense patch's compute next to the ZeRO-3 leaf's gathers. (Each
        # backend costs two launches, its parity gate and its timing; fsdp2-dense is left to the bench to
        # keep the session within a few minutes on 2 cores.)
        "multi-rank": [
            "--arch",
            "qwen3_moe",
            "--preset",
            "qwen3-30b-a3b",
            "--scale",
            "0.125",
            "--backend",
            "zero3-leaf",
            "zero2-dense",
            "--tokens",
            "64",
            "--pass",
            "fwdbwd",
        ],
    },
    "cuda": {
        "checkpoints": [
            "--preset",
            "qwen3-30b-a3b",
            "olmoe-1b-7b",
            "gpt-oss-20b",
            "--backend",
            "hf-eager",
            "hf-grouped-mm",
            "grouped-mm",
            "hf-dense",
            "--tokens",
            "64",
            "2048",
            "--routing",
            "natural",
            "zipf",
            "--pass",
            "fwd",
            "fwdbwd",
        ],
        # batched_mm gathers a weight copy per (token, slot): decode sizes only.
        "batched-decode": ["--preset", "qwen3-30b-a3b", "--backend", "hf-batched-mm", "--tokens", "1", "64"],
    },
    "npu": {
        "checkpoints": [
            "--preset",
            "qwen3-30b-a3b",
            "olmoe-1b-7b",
            "--backend",
            "hf-eager",
            "npu-gmm",
            "--tokens",
            "64",
            "2048",
            "--routing",
            "natural",
            "zipf",
            "--pass",
            "fwd",
            "fwdbwd",
        ],
    },
}


def _bench(name: str, args: list[str]) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    OUT.mkdir(parents=True, exist_ok=True)
    report = OUT / f"{name}.json"
    command = [
        sys.executable,
        "-m",
        "moeconf.bench",
        *args,
        "--device",
        DEVICE,
        "--repeat",
        REPEAT,
        "--format",
        "json",
        "--output",
        str(report),
        "--plot",
        str(OUT / name),
    ]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if not report.exists():
        pytest.fail(f"no report (exit {done.returncode}):\n{done.stderr[-4000:]}", pytrace=False)
    return done, json.loads(report.read_text())


def _insane(row: dict[str, Any]) -> list[str]:
    """What is wrong with a timed row's numbers (empty: sane)."""
    problems = []
    for name in (
        "median_s",
        "tokens_per_s",
        "flops",
        "bytes",
        "achieved_flops_per_s",
        "achieved_bytes_per_s",
        "limit_s",
        "ratio_to_limit",
    ):
        value = row.get(name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            problems.append(f"{name}={value!r}")
    if problems:
        return problems
    median = row["median_s"]
    expected = {
        "tokens_per_s": row["world_size"] * row["tokens"] / median,
        "achieved_flops_per_s": row["flops"] / median,
        "achieved_bytes_per_s": row["bytes"] / median,
        "ratio_to_limit": row["limit_s"] / median,
    }
    problems += [f"{k}={row[k]!r} != {v!r}" for k, v in expected.items() if not math.isclose(row[k], v, rel_tol=1e-9)]
    if not (isinstance(row.get("iqr_s"), (int, float)) and 0 <= row["iqr_s"] < math.inf):
        problems.append(f"iqr_s={row.get('iqr_s')!r}")
    if not (isinstance(row.get("peak_mem_bytes"), int) and row["peak_mem_bytes"] >= 0):
        problems.append(f"peak_mem_bytes={row.get('peak_mem_bytes')!r}")
    if row.get("samples") != int(REPEAT):
        problems.append(f"samples={row.get('samples')!r}")
    level = "step" if row["world_size"] > 1 else ("block" if row["routing"] == "natural" else "experts")
    if row.get("level") != level:
        problems.append(f"level={row.get('level')!r}, expected {level}")
    if not str(row.get("repro", "")).startswith("moeconf bench "):
        problems.append("no repro")
    return problems


@pytest.mark.parametrize("name", sorted(QUICK.get(DEVICE, {})))
def test_quick_presets_are_timed_with_sane_figures(name: str) -> None:
    require_device(DEVICE)
    done, report = _bench(name, QUICK[DEVICE][name])
    rows = report["results"]
    bad = [
        f"{r['status']} {r['arch']} {r['backend']} {r['preset']} {r['pass']} {r['routing']} N={r['tokens']}: "
        f"{r['message'] or ', '.join(_insane(r))}\n  repro: {r['repro']}"
        for r in rows
        if (r["status"] != "timed" and not (r["status"] == "unsupported" and r["message"]))
        or (r["status"] == "timed" and _insane(r))
    ]
    if bad:
        pytest.fail(f"{len(bad)} of {len(rows)} figure(s) not timed or not sane:\n" + "\n".join(bad), pytrace=False)
    assert done.returncode == 0, done.stderr[-4000:]
    timed = [r for r in rows if r["status"] == "timed"]
    assert timed, "nothing was timed"
    for backend in {r["backend"] for r in rows}:
        assert any(r["backend"] == backend for r in timed), f"{backend}: no figure timed"
    environment = report["environment"]
    assert environment["device"] == DEVICE and environment["threads"] >= 1 and environment["calibrations"]
    for png in ("throughput.png", "ratio_to_limit.png", "memory.png"):
        assert (OUT / name / png).stat().st_size > 0
