"""PNG plots of a bench run (matplotlib's Agg canvas, no pyplot state, no display needed).

- ``throughput.png``: tokens/s against tokens, one line per backend, a panel per (arch, preset, dtype,
  pass, routing);
- ``ratio_to_limit.png``: ``ratio_to_limit`` per backend, one bar per routing, a panel per (arch, preset,
  dtype, pass, tokens);
- ``memory.png``: peak memory against tokens, one line per backend (and routing), a panel per (arch,
  preset, dtype, pass).

Only figures with a median (``timed``, ``over_budget`` with samples) are drawn.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from moeconf.bench.report import write_atomically
from moeconf.bench.rows import BenchRow

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PANEL_W, PANEL_H, MAX_COLUMNS = 5.0, 3.6, 3


def _figure(panels: int) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    columns = min(MAX_COLUMNS, panels)
    lines = math.ceil(panels / columns)
    figure = Figure(figsize=(PANEL_W * columns, PANEL_H * lines), layout="constrained")
    axes = figure.subplots(lines, columns, squeeze=False).ravel().tolist()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return figure, axes


def _save(figure: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_atomically(path, buffer.getvalue())


def _grouped(
    rows: Sequence[BenchRow], key: Callable[[BenchRow], tuple[object, ...]]
) -> dict[tuple[object, ...], list[BenchRow]]:
    groups: dict[tuple[object, ...], list[BenchRow]] = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    return groups


def _lines(
    rows: Sequence[BenchRow],
    panel_key: Callable[[BenchRow], tuple[object, ...]],
    line_key: Callable[[BenchRow], str],
    value: Callable[[BenchRow], float | None],
    ylabel: str,
    path: Path,
) -> Path | None:
    panels = _grouped([r for r in rows if value(r) is not None], panel_key)
    if not panels:
        return None
    figure, axes = _figure(len(panels))
    for ax, (title, members) in zip(axes, panels.items()):
        for label, line in sorted(_grouped(members, lambda r: (line_key(r),)).items()):
            points = sorted((r.tokens, value(r) or 0.0) for r in line)
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=str(label[0]))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(" ".join(str(t) for t in title), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    _save(figure, path)
    return path


def _ratio_bars(rows: Sequence[BenchRow], path: Path) -> Path | None:
    drawn = [r for r in rows if r.ratio_to_limit is not None]
    panels = _grouped(drawn, lambda r: (r.arch, r.preset, r.dtype, r.pass_, f"N={r.tokens}"))
    if not panels:
        return None
    figure, axes = _figure(len(panels))
    for ax, (title, members) in zip(axes, panels.items()):
        backends = list(dict.fromkeys(r.backend for r in members))
        routings = list(dict.fromkeys(r.routing for r in members))
        width = 0.8 / len(routings)
        for j, routing in enumerate(routings):
            heights = [
                next((r.ratio_to_limit for r in members if r.backend == b and r.routing == routing), 0.0) or 0.0
                for b in backends
            ]
            ax.bar([i + j * width for i in range(len(backends))], heights, width, label=routing)
        ax.set_xticks(
            [i + width * (len(routings) - 1) / 2 for i in range(len(backends))], backends, rotation=30, fontsize=7
        )
        ax.set_ylabel("ratio to limit (limit_s / median_s)")
        ax.set_title(" ".join(str(t) for t in title), fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    _save(figure, path)
    return path


def write_plots(rows: Sequence[BenchRow], folder: Path) -> list[Path]:
    """Write the three PNGs into ``folder`` (created); returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    multiple_routings = len({r.routing for r in rows}) > 1
    written = [
        _lines(
            rows,
            lambda r: (r.arch, r.preset, r.dtype, r.pass_, r.routing),
            lambda r: r.backend,
            lambda r: r.tokens_per_s,
            "tokens/s",
            folder / "throughput.png",
        ),
        _ratio_bars(rows, folder / "ratio_to_limit.png"),
        _lines(
            rows,
            lambda r: (r.arch, r.preset, r.dtype, r.pass_),
            lambda r: f"{r.backend} {r.routing}" if multiple_routings else r.backend,
            lambda r: float(r.peak_mem_bytes) / 2**20 if r.peak_mem_bytes and r.median_s is not None else None,
            "peak memory above weights (MiB)",
            folder / "memory.png",
        ),
    ]
    return [p for p in written if p is not None]
