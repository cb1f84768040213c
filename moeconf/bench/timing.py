"""Timed runs of one figure: a probe, warm-up, ``--repeat`` samples, all under ``--budget``.

Statistics are torch.utils.benchmark's (``Measurement``: median and interquartile range of the samples,
per call), the clock is its ``timer`` (``time.perf_counter`` after ``torch.accelerator.synchronize()``
when an accelerator is present, so queued CUDA/NPU kernels are inside the interval).

NOTE why a loop around the callable rather than ``Timer.timeit`` / ``blocked_autorange``: the figure has
a user-given number of warm-up calls and samples, and a time budget that must be checked *between*
runs. ``Timer.timeit(number)`` runs ``max(number // 100, 2)`` hidden warm-up calls before every
sample, which triples the cost of a multi-second prefill figure, and ``blocked_autorange`` chooses how
many runs to make itself and cannot stop at a budget. Short calls are still batched the way
``blocked_autorange`` batches them: a sample runs the callable ``calls_per_sample`` times so that it
lasts at least ``MIN_SAMPLE_S`` (timer resolution and Python overhead stay negligible).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from torch.utils.benchmark.utils.common import Measurement, TaskSpec
from torch.utils.benchmark.utils.timer import timer as synchronized_timer

MIN_SAMPLE_S = 0.01
"""A sample lasts at least this long (calls are batched below it)."""

MIN_TIMED_SAMPLES = 3
"""Fewest samples that still make a ``timed`` figure when the budget cuts ``--repeat`` short.

Why 3: the median and interquartile range need three points to say anything about spread, and a
figure whose one call takes minutes (transformers' eager backward at checkpoint sizes) would otherwise
need a budget of ``(warmup + repeat) x call`` to be timed at all. Fewer samples than asked is said in
the row's message.
"""

TimingStatus = Literal["timed", "over_budget"]


@dataclass(frozen=True)
class RunPlan:
    """How many runs fit: further warm-up calls, samples, calls per sample."""

    warmup: int
    samples: int
    calls_per_sample: int


def plan_runs(first_s: float, warmup: int, repeat: int, budget_s: float, min_sample_s: float = MIN_SAMPLE_S) -> RunPlan:
    """The runs that fit in ``budget_s`` after a probe call that took ``first_s``.

    The probe is the first warm-up call (it is never a sample: it is cold). Samples are capped so that
    probe + warm-up + samples, at the probe's pace, stay within the budget.
    """
    calls = max(1, math.ceil(min_sample_s / max(first_s, 1e-9)))
    warm_left = max(0, warmup - 1)
    remaining = budget_s - first_s - warm_left * first_s
    affordable = math.floor(remaining / (calls * first_s)) if remaining > 0 else 0
    return RunPlan(warmup=warm_left, samples=max(0, min(repeat, affordable)), calls_per_sample=calls)


@dataclass
class Timing:
    """The samples of one figure and what became of it.

    ``samples_s`` are whole samples (``calls_per_sample`` calls each); ``median_s``/``iqr_s`` are per
    call. ``status`` is ``timed`` with ``--repeat`` samples, or with at least ``MIN_TIMED_SAMPLES`` when
    the budget cut the rest (``message`` says so); ``over_budget`` with fewer (``message`` says why);
    with no full sample the probe call is reported as the only measurement.
    """

    samples_s: list[float]
    calls_per_sample: int
    status: TimingStatus
    message: str = ""
    threads: int = 1
    label: str = ""
    _measurement: Measurement | None = field(default=None, repr=False)

    @property
    def measurement(self) -> Measurement | None:
        if self._measurement is None and self.samples_s:
            spec = TaskSpec(stmt=self.label or "figure", setup="", num_threads=self.threads)
            self._measurement = Measurement(self.calls_per_sample, list(self.samples_s), spec)
        return self._measurement

    @property
    def median_s(self) -> float | None:
        m = self.measurement
        return None if m is None else float(m.median)

    @property
    def iqr_s(self) -> float | None:
        m = self.measurement
        return None if m is None else float(m.iqr)


def measure(
    fn: Callable[[], object],
    *,
    warmup: int,
    repeat: int,
    budget_s: float,
    lower_bound_s: float | None = None,
    lower_bound_reason: str = "at the measured limits",
    threads: int = 1,
    label: str = "",
    clock: Callable[[], float] = synchronized_timer,
) -> Timing:
    """Time ``fn`` (see the module docstring); never starts a run that the budget cannot afford.

    ``lower_bound_s`` (what one call takes at least: the roofline limit, or a smaller token count's
    call) refuses up front a figure whose single call cannot fit in the budget, so a CPU never starts an
    hours-long call; ``lower_bound_reason`` says where the bound comes from.
    """

    def timing(samples: list[float], calls: int, status: TimingStatus, message: str = "") -> Timing:
        return Timing(samples, calls, status, message, threads, label)

    if lower_bound_s is not None and lower_bound_s > budget_s:
        return timing(
            [],
            1,
            "over_budget",
            f"not run: one call takes at least {lower_bound_s:.3g} s ({lower_bound_reason}), budget {budget_s:g} s",
        )
    start = clock()
    fn()
    first_s = clock() - start
    if first_s > budget_s:
        return timing(
            [first_s],
            1,
            "over_budget",
            f"one (cold) call took {first_s:.3g} s, budget {budget_s:g} s; reported: that call",
        )
    plan = plan_runs(first_s, warmup, repeat, budget_s)
    for _ in range(plan.warmup):
        fn()
    samples: list[float] = []
    for _ in range(plan.samples):
        t0 = clock()
        for _ in range(plan.calls_per_sample):
            fn()
        samples.append(clock() - t0)
        spent = clock() - start
        pace = sorted(samples)[len(samples) // 2]
        if len(samples) < plan.samples and spent + pace > budget_s:
            break  # the runs got slower than the probe promised
    if len(samples) >= repeat:
        return timing(samples, plan.calls_per_sample, "timed")
    if len(samples) >= MIN_TIMED_SAMPLES:
        return timing(
            samples, plan.calls_per_sample, "timed", budget_cut_message(len(samples), repeat, budget_s, first_s)
        )
    if not samples:
        return timing(
            [first_s],
            1,
            "over_budget",
            f"probe call {first_s:.3g} s; no sample fits in the budget {budget_s:g} s "
            "after the warm-up; reported: the probe",
        )
    return timing(
        samples, plan.calls_per_sample, "over_budget", budget_cut_message(len(samples), repeat, budget_s, first_s)
    )


def timed_status(samples: int, repeat: int) -> TimingStatus:
    """``timed`` with every sample asked for, or with ``MIN_TIMED_SAMPLES`` of them; else ``over_budget``."""
    return "timed" if samples >= min(repeat, MIN_TIMED_SAMPLES) else "over_budget"


def budget_cut_message(samples: int, repeat: int, budget_s: float, call_s: float, unit: str = "samples") -> str:
    """What a figure that the budget cut short says (empty when nothing was cut)."""
    if samples >= repeat:
        return ""
    return f"{samples} of {repeat} {unit} fit in the budget {budget_s:g} s (one call ≈ {call_s:.3g} s)"
