"""Step 6 of discover: judge candidates as ``moeconf check`` does, and order them.

A candidate is an ``ArchEntry``. The hf-eager backend runs the block once per distinct parameter set
(canonical parameters drawn by ``draw_params`` for the candidate's spec, loaded through its bindings)
on a pool of tokens. Each candidate is then judged, with the harness's checks and fp32 tolerances, on
the pool tokens it routes with a margin (``select_tokens``, the token filter of every case): the
backend's observation restricted to those tokens against ``reference_forward`` on them. The proposal
is finally run through the engine itself (``verify_entry``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moeconf.backends import Observation, RunRequest
from moeconf.backends.hf import HF_EAGER
from moeconf.devices import DTYPES
from moeconf.harness.cases import CASE_SEED_STRIDE, CaseError, draw_params, select_tokens, token_pool
from moeconf.harness.checks import CHECKS, CheckInput, Outcome
from moeconf.harness.engine import CheckResult, Selection, run_arch
from moeconf.harness.validate import validate_observation
from moeconf.params import Params, param_shapes, round_through
from moeconf.reference import ReferenceResult, reference_forward, route
from moeconf.registry.entry import ArchEntry, Binding
from moeconf.spec import MoESpec
from moeconf.tools.audit import brief_error as brief

DTYPE = "fp32"
"""Candidates are judged in fp32: tight tolerances, so a wrong formula cannot pass."""

POOL_SHAPE = (8, 64)
"""``[B, S]`` tokens the block runs on once per parameter set; candidates are judged on subsets."""

POOL_SALT = 17
"""The pool's token stream is ``seed * CASE_SEED_STRIDE + POOL_SALT``, the cases' scheme with a salt
no case uses (theirs are their names' character sums, in the hundreds)."""

JUDGED_TOKENS = (256, 64, 16)
"""Tokens a candidate is judged on: the first of these counts the pool can supply with routing (and
clamp) margins. Many tokens tell close router families apart; a candidate with few qualifying tokens
(a small clamp limit keeps a quarter) is still judged on fewer, down to 16."""

ROUTING_CHECKS = ("routing", "routing_weights")
OUTPUT_CHECKS = (*ROUTING_CHECKS, "output")
"""Checks a candidate is judged by: routing alone (stage 1 of the search), then with the output."""


def pool_tokens(hidden: int, seed: int) -> torch.Tensor:
    """``[B·S, H]`` float64 pool tokens (``POOL_SHAPE``), rounded through the judging dtype."""
    gen = torch.Generator().manual_seed(seed * CASE_SEED_STRIDE + POOL_SALT)
    return token_pool(hidden, POOL_SHAPE[0] * POOL_SHAPE[1], DTYPES[DTYPE], gen)


def _any_routing(index: torch.Tensor) -> torch.Tensor:
    """``[N]`` all True: the judged tokens have no case constraint."""
    return torch.ones(index.shape[0], dtype=torch.bool)


def _restricted(obs: Observation, rows: torch.Tensor, hidden: int) -> Observation:
    """The pool observation on the pool rows ``rows [T]``: output ``[1, T, H]``, routing ``[T, k]``."""
    return Observation(
        output=obs.output.reshape(-1, hidden)[rows].unsqueeze(0),
        topk_index=None if obs.topk_index is None else obs.topk_index[rows],
        topk_weights=None if obs.topk_weights is None else obs.topk_weights[rows],
    )


def _reference(spec: MoESpec, params: Params, hidden: torch.Tensor, checks: Sequence[str]) -> ReferenceResult:
    """The reference on ``hidden [1, T, H]``; without the output when no check reads it (the routing
    checks read ``routing`` only, and the experts are most of the reference's time)."""
    if "output" in checks:
        return reference_forward(spec, params, hidden)
    routing = route(spec, params, hidden.reshape(-1, spec.hidden))
    return ReferenceResult(routing, output=torch.full_like(hidden, math.nan), aux_loss=None, z_loss=None)


ParamsKey = tuple[Any, ...]
"""What canonical parameters are drawn from (see ``Judge._drawn``)."""


class Judge:
    """Judges the candidates of one block on one pool (``seed``); the backend runs once per
    distinct (parameters, bindings), however many candidates share them."""

    def __init__(self, hidden: int, seed: int) -> None:
        self.hidden = hidden
        self.seed = seed
        self.pool = pool_tokens(hidden, seed)
        # select_tokens returns rows, not positions: rows are distinct draws, so their bytes find them.
        self._row = {row.tobytes(): i for i, row in enumerate(self.pool.numpy())}
        self._params: dict[ParamsKey, Params] = {}
        self._observed: dict[tuple[ParamsKey, tuple[Binding, ...]], Observation | str] = {}

    def _drawn(self, spec: MoESpec) -> tuple[ParamsKey, Params]:
        """``draw_params`` for ``spec``, rounded through the judging dtype; drawn once per key.

        NOTE: the key is what ``draw_params`` reads (the shapes; scoring and selection for the
        selection bias's scale). Were it to read more, a candidate would get a sibling's draw: still
        a valid test (block and reference get the same parameters), only a less tailored one.
        """
        key = (tuple(param_shapes(spec).items()), spec.router.scoring, spec.router.select_on)
        if key not in self._params:
            self._params[key] = round_through(draw_params(spec, self.seed), DTYPES[DTYPE])
        return key, self._params[key]

    def _observe(self, entry: ArchEntry, drawn: ParamsKey, params: Params) -> Observation | str:
        """The backend's validated observation of the whole pool, or why there is none."""
        key = (drawn, entry.params)
        if key not in self._observed:
            hidden = self.pool.reshape(*POOL_SHAPE, self.hidden)
            request = RunRequest(
                entry, params, hidden, torch.ones(POOL_SHAPE, dtype=torch.int64), torch.zeros_like(hidden),
                DTYPES[DTYPE], "cpu",
            )  # fmt: skip
            try:
                self._observed[key] = validate_observation(HF_EAGER.run(request), request)
            except Exception as exc:  # noqa: BLE001 — bindings that do not fit the block: report, go on
                self._observed[key] = f"backend raised {brief(exc, 300)}"
        return self._observed[key]

    def _judged_rows(self, entry: ArchEntry, params: Params) -> torch.Tensor | str:
        """Positions ``[T]`` of the pool tokens the candidate routes with a margin, or why too few."""
        why = ""
        for count in JUDGED_TOKENS:
            try:
                rows = select_tokens(entry.spec, params, self.pool, count, _any_routing, "judged tokens")
            except CaseError as exc:
                why = str(exc)
                continue
            return torch.tensor([self._row[row.tobytes()] for row in rows.numpy()])
        return why

    def outcomes(self, entry: ArchEntry, checks: Sequence[str]) -> tuple[dict[str, Outcome], int, str]:
        """``(check → outcome, tokens judged, why not judged)`` of one candidate."""
        key, params = self._drawn(entry.spec)
        observed = self._observe(entry, key, params)
        if isinstance(observed, str):
            return {}, 0, observed
        rows = self._judged_rows(entry, params)
        if isinstance(rows, str):
            return {}, 0, rows
        hidden = self.pool[rows].unsqueeze(0)
        reference = _reference(entry.spec, params, hidden, checks)
        ci = CheckInput(entry.spec, reference, {}, _restricted(observed, rows, self.hidden), DTYPE)
        return {name: CHECKS[name](ci) for name in checks}, len(rows), ""


@dataclass(frozen=True)
class Candidate:
    """One tried reading of the block and how far it is from the reference.

    Attributes:
        router, experts, shared: labels of the router family / expert form / shared form.
        entry: the candidate as a registry entry (None if it could not even be built).
        outcomes: check name → outcome on the judged tokens (empty when not judged).
        tokens: how many pool tokens it was judged on.
        matched: every check within the fp32 tolerances, the output included.
        affinity: agreement with the router source (tie-break among matches).
        simplicity: minus the router options used (the next tie-break).
        message: why it failed, if it did.
    """

    router: str
    experts: str
    shared: str
    entry: ArchEntry | None
    outcomes: Mapping[str, Outcome]
    tokens: int
    matched: bool
    affinity: int = 0
    simplicity: int = 0
    message: str = ""

    @property
    def name(self) -> str:
        return f"router={self.router} | experts={self.experts} | shared={self.shared}"

    @property
    def routing_mismatch(self) -> int | None:
        """Tokens routed to another expert set (None: routing not observed or not judged)."""
        outcome = self.outcomes.get("routing")
        if outcome is None or outcome.passed is None:
            return None
        # check_routing reports the count of wrongly routed tokens as its error; none when the
        # shapes disagree, where no token is comparable.
        return int(outcome.max_abs_err) if outcome.max_abs_err is not None else self.tokens

    def error(self, check: str) -> float | None:
        """The check's max |actual − expected| (None: not judged or not observable)."""
        outcome = self.outcomes.get(check)
        return None if outcome is None else outcome.max_abs_err

    @property
    def max_error(self) -> float:
        errors = [e for e in (self.error("routing_weights"), self.error("output")) if e is not None]
        return max(errors) if errors else math.inf

    def rank_key(self) -> tuple[Any, ...]:
        """Matches first (source agreement, then the simpler reading break ties); then the closest misses."""
        if self.matched:
            return (0, -self.affinity, -self.simplicity, self.max_error)
        return (1, self.routing_mismatch or 0, self.max_error)


def judged(
    judge: Judge, labels: tuple[str, str, str], entry: ArchEntry, routing_only: bool, affinity: int, simplicity: int
) -> Candidate:
    """``entry`` judged on routing alone, or on routing and output (only the latter can match)."""
    outcomes, tokens, why = judge.outcomes(entry, ROUTING_CHECKS if routing_only else OUTPUT_CHECKS)
    failed = [o.message for o in outcomes.values() if o.passed is False]
    matched = not why and not routing_only and not failed and outcomes["output"].passed is True
    return Candidate(*labels, entry, outcomes, tokens, matched, affinity, simplicity, why or "; ".join(failed))


def unbuildable(labels: tuple[str, str, str], why: str) -> Candidate:
    """A combination the spec rejects (never ranked above a built one)."""
    return Candidate(*labels, None, {}, 0, False, message=why)


def verify_entry(entry: ArchEntry, seed: int = 0) -> list[CheckResult]:
    """The engine's fp32 hf-eager records of ``entry`` on every case (``moeconf check`` parity)."""
    selection = Selection(archs=(entry.model_type,), seed=seed)
    return [r for group in run_arch(selection, entry, {HF_EAGER.name: HF_EAGER}, DTYPE) for r in group]
