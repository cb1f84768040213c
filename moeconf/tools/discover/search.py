"""``discover``: locate the block, read it, try candidate specs against it, propose the best.

The search has two stages. Routing alone (index sets and weights) first decides among the router
families, with the first expert and shared form; then every expert and shared form is tried with the
router families that route like the block. A match is within the fp32 tolerances on routing, routing
weights and output; among matches the source code and then simplicity decide.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import moeconf.tools.discover.candidates as router_space
from moeconf.harness.engine import CheckResult
from moeconf.registry.entry import ArchEntry
from moeconf.tools.audit import brief_error as brief
from moeconf.tools.discover.bindings import Form, expert_forms, extra_forms, shared_forms
from moeconf.tools.discover.candidates import BlockReading, RouterCandidate, losses_of, simplicity, source_affinity
from moeconf.tools.discover.facts import read_block
from moeconf.tools.discover.locate import Site, locate
from moeconf.tools.discover.rank import Candidate, Judge, judged, unbuildable, verify_entry
from moeconf.tools.discover.render import entry_source

FALLBACK_ROUTERS = 3
"""Router families carried to stage 2 when no family routes like the block (or routing is not
observable): the closest few by output error."""


@dataclass
class DiscoveryResult:
    """Everything ``discover`` found for one model type (``candidates`` ranked best first)."""

    model_type: str
    candidates: list[Candidate] = field(default_factory=list)
    best: Candidate | None = None
    proposed_entry: ArchEntry | None = None
    proposed_entry_source: str | None = None
    explanation: str = ""
    site: Site | None = None
    parity: list[CheckResult] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.proposed_entry is not None


class _Search:
    """The candidates of one block, judged once each (a routing-only verdict is kept apart)."""

    def __init__(self, reading: BlockReading, judge: Judge) -> None:
        self.reading = reading
        self.judge = judge

    def evaluate(self, router: RouterCandidate, experts: Form, shared: Form, routing_only: bool) -> Candidate:
        labels = (router.label, experts.label, shared.label)
        try:
            entry = self.reading.entry(router, experts, shared)
        except ValueError as exc:
            return unbuildable(labels, str(exc))
        affinity = source_affinity(router, experts.spec["glu"], self.reading.facts.hints)
        return judged(self.judge, labels, entry, routing_only, affinity, simplicity(router))

    def routers_like_the_block(
        self, routers: Sequence[RouterCandidate], experts: Form, shared: Form
    ) -> tuple[list[RouterCandidate], list[Candidate]]:
        """Stage 1: the router families whose routing matches the block's, and their verdicts."""
        verdicts = [self.evaluate(r, experts, shared, routing_only=True) for r in routers]
        routed = [
            r for r, c in zip(routers, verdicts) if c.entry is not None and c.routing_mismatch == 0 and not c.message
        ]
        if not routed:  # routing unobservable or nothing routes alike: the outputs of the first form decide
            by_output = sorted(
                zip(routers, (self.evaluate(r, experts, shared, routing_only=False) for r in routers)),
                key=lambda rc: rc[1].rank_key(),
            )
            routed = [r for r, _ in by_output[:FALLBACK_ROUTERS]]
        return routed, verdicts

    def ranked(self, routers: Sequence[RouterCandidate], experts: list[Form], shared: list[Form]) -> list[Candidate]:
        """Stage 2 over every expert and shared form; stage-1 verdicts of the other routers follow."""
        routed, stage1 = self.routers_like_the_block(routers, experts[0], shared[0])
        stage2 = [self.evaluate(r, e, s, routing_only=False) for r in routed for e in experts for s in shared]
        tried = {(c.router, c.experts, c.shared) for c in stage2}
        rest = [c for c in stage1 if (c.router, c.experts, c.shared) not in tried]
        return sorted(stage2 + rest, key=lambda c: c.rank_key())


def _no_match(model_type: str, candidates: Sequence[Candidate], problems: Sequence[str]) -> str:
    lines = [f"no candidate reproduces the {model_type} block within the fp32 tolerances."]
    if candidates:
        closest = candidates[0]
        routed_off = f", {closest.routing_mismatch} tokens routed differently" if closest.routing_mismatch else ""
        lines.append(f"closest: {closest.name} (max error {closest.max_error:.3g}{routed_off}): {closest.message}")
    lines.append(
        "The block may compute something the spec cannot express yet (a new router family, expert "
        "activation, identity experts, per-expert scales, extra forward inputs): add the field to "
        "moeconf/spec.py and its formula to moeconf/reference/, then retry."
    )
    return "\n".join(lines + list(problems))


def discover(
    model_type: str, config_kwargs: Mapping[str, Any] | None = None, verify: bool = True, seed: int = 0
) -> DiscoveryResult:
    """Find the spec and bindings of ``model_type``'s MoE block by trying candidates against it.

    Args:
        model_type: an installed transformers model type.
        config_kwargs: use this tiny config instead of the generic shrink (e.g. an existing entry's).
        verify: run the proposed entry through the engine (hf-eager, fp32, every case).
        seed: parameter and token seed (the engine's ``--seed``).
    """
    start = time.perf_counter()
    result = DiscoveryResult(model_type)
    try:
        result.site = locate(model_type, config_kwargs)
        block, facts, config = read_block(result.site, seed)
    except Exception as exc:  # noqa: BLE001 — whatever stops the block being built is the explanation
        result.explanation = f"could not build and read a tiny {model_type} MoE block: {brief(exc, 400)}"
        result.wall_s = time.perf_counter() - start
        return result

    experts, why_experts = expert_forms(block, facts)
    shared, why_shared = shared_forms(block, facts, config)
    extra, why_extra = extra_forms(block, facts)
    problems = [w for w in (why_experts, why_shared, why_extra) if w]
    if not experts or not shared or why_extra:
        result.explanation = "no candidate can bind every block parameter: " + "; ".join(problems)
        result.wall_s = time.perf_counter() - start
        return result

    losses, aux_attr = losses_of(result.site.modeling_module)
    reading = BlockReading(model_type, result.site.probe_entry(), facts, extra, losses, aux_attr)
    routers = router_space.router_candidates(facts, config)  # looked up on the module: tests narrow it
    result.candidates = _Search(reading, Judge(facts.hidden, seed)).ranked(routers, experts, shared)
    best = result.candidates[0] if result.candidates and result.candidates[0].matched else None
    if best is None or best.entry is None:
        result.explanation = _no_match(model_type, result.candidates, problems)
    else:
        result.best, result.proposed_entry = best, best.entry
        result.proposed_entry_source = entry_source(best.entry)
        if verify:
            result.parity = verify_entry(best.entry, seed)
    result.wall_s = time.perf_counter() - start
    return result
