"""Reports of a bench run: the environment, a rich text table, JSON; written whole or not at all."""

from __future__ import annotations

import datetime
import io
import json
import os
import platform
import subprocess
from collections import Counter
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from moeconf.bench.memory import peak_memory_method
from moeconf.bench.roofline import calibrations
from moeconf.bench.rows import FAILING_ROWS, ROW_STATUSES, BenchRow
from moeconf.harness.report import write_atomically

__all__ = ["environment", "to_json", "to_text", "write_atomically"]

REPO = Path(__file__).resolve().parents[2]


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo, else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    if device == "npu" and hasattr(torch, "npu"):
        return str(torch.npu.get_device_name())
    return cpu_model()


def git_revision() -> tuple[str | None, bool | None]:
    """``(HEAD, uncommitted changes to tracked files)`` of the checkout moeconf runs from, if any."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(REPO), *args], check=False, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if head else None
    return head, (bool(status) if status is not None else None)


def environment(device: str, threads: int, command: Sequence[str] = ()) -> dict[str, Any]:
    """What a figure depends on besides the code: versions, device, threads, revision, calibrations."""
    head, dirty = git_revision()
    return {
        "moeconf": _package_version("moeconf"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _package_version("transformers"),
        "deepspeed": _package_version("deepspeed"),
        "torch_npu": _package_version("torch_npu"),
        "platform": platform.platform(),
        "device": device,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "git_revision": head,
        "git_dirty": dirty,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": list(command),
        "peak_mem_method": peak_memory_method(device),
        "calibrations": [c.to_dict() for c in calibrations()],
    }


def summary(rows: Sequence[BenchRow], wall_s: float | None = None) -> dict[str, Any]:
    counts = Counter(r.status for r in rows)
    out: dict[str, Any] = {s: counts.get(s, 0) for s in ROW_STATUSES}
    out["total"] = len(rows)
    out["ok"] = not any(r.status in FAILING_ROWS for r in rows)
    if wall_s is not None:
        out["wall_s"] = round(wall_s, 1)
    return out


def to_json(
    rows: Sequence[BenchRow],
    env: dict[str, Any],
    wall_s: float | None = None,
    comparison: dict[str, Any] | None = None,
) -> str:
    doc: dict[str, Any] = {"environment": env, "results": [r.to_dict() for r in rows], "summary": summary(rows, wall_s)}
    if comparison is not None:
        doc["comparison"] = comparison
    return json.dumps(doc, indent=1) + "\n"


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, factor in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if value >= factor:
            return f"{value / factor:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns"


def rate(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    for prefix, factor in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".strip()


def size(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= factor:
            return f"{value / factor:.3g} {unit}"
    return f"{value} B"


COLUMNS = (
    "arch",
    "backend",
    "preset",
    "dtype",
    "dev",
    "pass",
    "routing",
    "level",
    "tokens",
    "status",
    "median",
    "IQR",
    "tokens/s",
    "FLOP/s",
    "bytes/s",
    "limit",
    "ratio",
    "peak mem",
)


def _cells(r: BenchRow) -> list[str]:
    ratio = "-" if r.ratio_to_limit is None else f"{r.ratio_to_limit:.3f}"
    limit = "-" if r.limit_s is None else f"{seconds(r.limit_s)} ({r.limit_bound})"
    return [
        r.arch,
        r.backend,
        r.preset,
        r.dtype,
        r.device,
        r.pass_,
        r.routing,
        r.level or "-",
        str(r.tokens),
        r.status,
        seconds(r.median_s),
        seconds(r.iqr_s if r.samples > 1 else None),
        rate(r.tokens_per_s),
        rate(r.achieved_flops_per_s),
        rate(r.achieved_bytes_per_s, "B"),
        limit,
        ratio,
        size(r.peak_mem_bytes),
    ]


def _render(*renderables: Any) -> str:
    """Rich output as plain text, never wrapped: the console is as wide as the widest table needs."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=100_000, color_system=None, highlight=False, emoji=False)
    for item in renderables:
        console.print(item)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"


def to_text(
    rows: Sequence[BenchRow],
    env: dict[str, Any],
    wall_s: float | None = None,
    comparison_lines: Sequence[str] = (),
) -> str:
    """The table (one row per figure), then what was not timed and why, the limits, the summary."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name in COLUMNS:
        numeric = name in {"tokens", "median", "IQR", "tokens/s", "FLOP/s", "bytes/s", "limit", "ratio", "peak mem"}
        table.add_column(name, justify="right" if numeric else "left", no_wrap=True)
    for r in rows:
        if r.status != "unsupported":
            table.add_row(*_cells(r))
    lines: list[str] = []
    problems: dict[tuple[str, str, str, str, str, str], list[BenchRow]] = {}
    for r in rows:
        if r.status in FAILING_ROWS | {"over_budget"}:
            problems.setdefault((r.status, r.arch, r.backend, r.preset, r.dtype, r.message), []).append(r)
    if problems:
        lines += ["", "not timed, failed or over budget:"]
        for (status, arch, backend, preset, dtype, message), members in problems.items():
            lines.append(f"- {status.upper()} {arch} {backend} {preset} {dtype}: {message}")
            lines += [f"  {r.pass_} {r.routing} N={r.tokens}: {r.repro}" for r in members]
    unsupported = Counter((r.backend, r.message) for r in rows if r.status == "unsupported")
    if unsupported:
        lines += ["", "unsupported here (not counted as failures):"]
        lines += [f"- {backend}: {reason} ({n} figure(s))" for (backend, reason), n in unsupported.items()]
    revision = str(env.get("git_revision"))[:12] + (" (dirty)" if env.get("git_dirty") else "")
    environment_line = (
        f"environment: torch {env.get('torch')}, transformers {env.get('transformers')}, deepspeed "
        f"{env.get('deepspeed')}, {env.get('device')} ({env.get('device_name')}), {env.get('threads')} thread(s), "
        f"git {revision}"
    )
    lines += ["", environment_line]
    lines.append(f"peak mem: {env.get('peak_mem_method')}")
    for c in env.get("calibrations", []):
        unit = "FLOP/s" if c["kind"] == "gemm" else "B/s"
        lines.append(
            f"limit {c['kind']} {c['dtype']} {c['size_class']} {c['threads']} thread(s), {c.get('where', 'bench process')}: "
            f"{rate(c['per_s'], unit)} ({c['detail']})"
        )
    if comparison_lines:
        lines += ["", *comparison_lines]
    s = summary(rows, wall_s)
    tail = f" in {s['wall_s']} s" if "wall_s" in s else ""
    lines += ["", " ".join(f"{s[k]} {k}" for k in ROW_STATUSES) + tail]
    return _render(table) + "\n".join(lines) + "\n"
