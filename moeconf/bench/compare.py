"""The regression gate: this run's figures against a baseline report.

Rows are matched by their key (arch, backend, preset, dtype, device, pass, routing, tokens). A figure
timed in the baseline and measured now (timed, or over budget with what it measured: a slowdown must
not escape the gate by becoming too slow to finish) is a regression when it is slower than the baseline
by more than ``max(threshold, noise)``, relative to the baseline median, where

    noise = (iqr_baseline + iqr_current) / (2 · median_baseline)

i.e. the slowdown must be larger than the two runs' half interquartile ranges together: the middle
halves of the two sets of samples, centred on their medians, do not overlap. A difference that the
spread of the runs could explain is not a regression. Other figures are listed, not judged; a differing environment (device,
threads, library versions) is warned about, because it makes the comparison one of machines.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moeconf.bench.rows import KEY_FIELDS

DEFAULT_THRESHOLD = 0.10
ENVIRONMENT_KEYS = ("device", "device_name", "cpu_model", "threads", "torch", "transformers", "deepspeed", "torch_npu")


class BaselineError(ValueError):
    """The baseline cannot be read as a bench JSON report (a usage error)."""


@dataclass(frozen=True)
class Verdict:
    """One matched figure."""

    key: tuple[Any, ...]
    baseline_s: float
    current_s: float
    slowdown: float
    """``current / baseline - 1`` (0.25: 25 % slower)."""
    noise: float
    tolerance: float
    """``max(threshold, noise)``."""
    regressed: bool

    def describe(self) -> str:
        fields = " ".join(f"{k}={v}" for k, v in zip(KEY_FIELDS, self.key))
        return (
            f"{fields}: {self.current_s * 1e3:.4g} ms vs baseline {self.baseline_s * 1e3:.4g} ms "
            f"({self.slowdown:+.1%}, tolerance {self.tolerance:.1%})"
        )


@dataclass
class Comparison:
    threshold: float
    verdicts: list[Verdict] = field(default_factory=list)
    not_compared: list[str] = field(default_factory=list)
    environment_warnings: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.regressed]

    def lines(self) -> list[str]:
        """What the report and stderr show."""
        out = [f"WARNING: environment differs from the baseline: {w}" for w in self.environment_warnings]
        if self.regressions:
            out.append(f"{len(self.regressions)} regression(s) against the baseline:")
            out += [f"- REGRESSION {v.describe()}" for v in self.regressions]
        faster = sum(v.slowdown < -v.tolerance for v in self.verdicts)
        out.append(
            f"compared {len(self.verdicts)} figure(s) with the baseline: {len(self.regressions)} slower, "
            f"{faster} faster, {len(self.verdicts) - len(self.regressions) - faster} within tolerance "
            f"(threshold {self.threshold:.0%}); {len(self.not_compared)} not compared"
        )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "regressions": [asdict(v) for v in self.regressions],
            "verdicts": [asdict(v) for v in self.verdicts],
            "not_compared": self.not_compared,
            "environment_warnings": self.environment_warnings,
        }


def load_report(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(environment, results)`` of a bench JSON report."""
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise BaselineError(f"cannot read baseline {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise BaselineError(f"baseline {path} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise BaselineError(f"baseline {path} is not a moeconf bench report (no results list)")
    for i, row in enumerate(doc["results"]):
        missing = [k for k in (*KEY_FIELDS, "status", "median_s", "iqr_s") if not isinstance(row, dict) or k not in row]
        if missing:
            raise BaselineError(f"baseline {path}: results[{i}] lacks {', '.join(missing)}")
    return dict(doc.get("environment") or {}), list(doc["results"])


def relative_noise(baseline: dict[str, Any], current: dict[str, Any]) -> float:
    """The two half IQRs added, relative to the baseline median (see the module docstring)."""
    return ((baseline.get("iqr_s") or 0.0) + (current.get("iqr_s") or 0.0)) / (2 * baseline["median_s"])


def judge(key: tuple[Any, ...], baseline: dict[str, Any], current: dict[str, Any], threshold: float) -> Verdict:
    slowdown = current["median_s"] / baseline["median_s"] - 1.0
    noise = relative_noise(baseline, current)
    tolerance = max(threshold, noise)
    return Verdict(key, baseline["median_s"], current["median_s"], slowdown, noise, tolerance, slowdown > tolerance)


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[k] for k in KEY_FIELDS)


def _measured(row: dict[str, Any], statuses: tuple[str, ...]) -> bool:
    median = row.get("median_s")
    return row.get("status") in statuses and isinstance(median, (int, float)) and median > 0


def environment_differences(current: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    return [
        f"{k}: {baseline.get(k)!r} (baseline) vs {current.get(k)!r}"
        for k in ENVIRONMENT_KEYS
        if k in current and k in baseline and current.get(k) != baseline.get(k)
    ]


def compare(
    current: Sequence[dict[str, Any]],
    baseline: Sequence[dict[str, Any]],
    threshold: float = DEFAULT_THRESHOLD,
    current_env: dict[str, Any] | None = None,
    baseline_env: dict[str, Any] | None = None,
) -> Comparison:
    """Judge every figure of ``current`` that the baseline has (rows as JSON dicts)."""
    comparison = Comparison(threshold)
    comparison.environment_warnings = environment_differences(current_env or {}, baseline_env or {})
    base_by_key = {_key(r): r for r in baseline}
    for row in current:
        key = _key(row)
        base = base_by_key.get(key)
        label = " ".join(f"{k}={v}" for k, v in zip(KEY_FIELDS, key))
        if base is None:
            comparison.not_compared.append(f"{label}: not in the baseline")
        # NOTE: a figure that now runs over budget is judged on what it measured: a slowdown must not
        # escape the gate by becoming too slow to finish.
        elif _measured(base, ("timed",)) and _measured(row, ("timed", "over_budget")):
            comparison.verdicts.append(judge(key, base, row, threshold))
        else:
            comparison.not_compared.append(f"{label}: {base.get('status')} (baseline) vs {row.get('status')}")
    return comparison
