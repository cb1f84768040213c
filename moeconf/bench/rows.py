"""One figure of the benchmark: its key, its status, its measurements (the JSON schema's ``results[]``).

Statuses:

| status        | meaning                                                                         | exit |
|---------------|---------------------------------------------------------------------------------|------|
| `timed`       | every sample taken, or at least 3 when ``--budget`` cut the rest (the message   | 0    |
|               | says so)                                                                        |      |
| `over_budget` | the figure would run past ``--budget`` with fewer than 3 samples, or out of     | 0    |
|               | memory: what was measured so far, and why                                       |      |
| `unsupported` | the backend cannot run this architecture / routing / pass here (the reason)     | 0    |
| `not_timed`   | the backend failed a parity check at the tiny config (the failing check named): | 1    |
|               | a wrong kernel gets no speed                                                    |      |
| `error`       | the backend raised while being prepared or timed                                | 1    |
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from moeconf.bench.flops import Level, Pass
from moeconf.bench.routing import Routing

RowStatus = Literal["timed", "not_timed", "over_budget", "error", "unsupported"]
ROW_STATUSES: tuple[RowStatus, ...] = ("timed", "over_budget", "unsupported", "not_timed", "error")
FAILING_ROWS: frozenset[str] = frozenset({"not_timed", "error"})
KEY_FIELDS = ("arch", "backend", "preset", "dtype", "device", "pass", "routing", "tokens")
"""What identifies a figure across runs (``--compare`` matches on it)."""


@dataclass
class BenchRow:
    """One figure. ``tokens`` are per rank for multi-rank backends (``world_size`` ranks each ran them).

    Rates are per second of the median; ``flops`` / ``bytes`` are what the pass must compute / move
    (``moeconf.bench.flops``), summed over ranks; ``limit_s`` is the roofline of one rank's share
    (``moeconf.bench.roofline``), ``ratio_to_limit = limit_s / median_s``.
    """

    arch: str
    backend: str
    preset: str
    dtype: str
    device: str
    pass_: Pass
    routing: Routing
    tokens: int
    status: RowStatus
    level: Level | None = None
    sizes: str = ""
    scale: float = 1.0
    median_s: float | None = None
    iqr_s: float | None = None
    samples: int = 0
    calls_per_sample: int = 0
    tokens_per_s: float | None = None
    flops: int | None = None
    achieved_flops_per_s: float | None = None
    bytes: int | None = None
    achieved_bytes_per_s: float | None = None
    limit_s: float | None = None
    limit_bound: str | None = None
    ratio_to_limit: float | None = None
    peak_mem_bytes: int | None = None
    experts_touched: int | None = None
    threads: int | None = None
    world_size: int = 1
    message: str = ""
    repro: str = ""

    def key(self) -> tuple[object, ...]:
        d = self.to_dict()
        return tuple(d[k] for k in KEY_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {("pass" if k == "pass_" else k): v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchRow:
        names = {f.name for f in fields(cls)}
        values = {("pass_" if k == "pass" else k): v for k, v in data.items()}
        return cls(**{k: v for k, v in values.items() if k in names})

    def with_measurements(self, median_s: float, flops: int, nbytes: int, limit_s: float, world_size: int = 1) -> None:
        """Fill the rates from the median (``tokens`` per rank, ``flops``/``nbytes`` over all ranks)."""
        self.median_s = median_s
        self.tokens_per_s = world_size * self.tokens / median_s
        self.flops, self.bytes, self.limit_s = flops, nbytes, limit_s
        self.achieved_flops_per_s = flops / median_s
        self.achieved_bytes_per_s = nbytes / median_s
        self.ratio_to_limit = limit_s / median_s


@dataclass(frozen=True)
class ReproOptions:
    """What every repro line carries besides the figure's key."""

    program: str
    repeat: int
    warmup: int
    budget_s: float
    threads: int
    scale: float
    seed: int


def repro_command(row: BenchRow, options: ReproOptions) -> str:
    """A command line that reruns exactly this figure."""
    args = [
        *shlex.split(options.program),
        "bench",
        "--arch",
        row.arch,
        "--backend",
        row.backend,
        "--preset",
        row.preset,
        "--tokens",
        str(row.tokens),
        "--routing",
        row.routing,
        "--pass",
        row.pass_,
        "--dtype",
        row.dtype,
        "--device",
        row.device,
        "--repeat",
        str(options.repeat),
        "--warmup",
        str(options.warmup),
        "--budget",
        f"{options.budget_s:g}",
        "--threads",
        str(options.threads),
    ]
    if options.scale != 1.0:
        args += ["--scale", f"{options.scale:g}"]
    if options.seed:
        args += ["--seed", str(options.seed)]
    return shlex.join(args)
