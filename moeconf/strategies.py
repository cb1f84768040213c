"""Hypothesis strategies over a registry entry's config space, for moeconf and for downstream projects.

``config_samples(entry)`` draws valid configs of the entry: every routing field the block reads
(``moeconf.hf.configs.varied_rules``) over its domain — every boolean both ways, ``k`` from 1 to the
experts a token can reach, group counts that divide ``E`` with ``1 ≤ topk_group ≤ n_group``, p-norms,
scaling factors, shared widths, capacities — and, for a router with a selection bias, the trained
bias state (both signs, magnitudes that dominate the scores). Sizes stay tiny. Hypothesis shrinks a
failing draw towards the smallest config (fewest experts, k = 1, flags off).

Example (a downstream test of a patched block)::

    from hypothesis import given, settings
    from moeconf.registry import get_entry
    from moeconf.strategies import config_samples

    @settings(max_examples=20, deadline=None)
    @given(config_samples(get_entry("qwen3_moe")))
    def test_my_block(sample):
        records = run_sample("qwen3_moe", sample, backend="my-backend")  # see docs/config-space.md
        assert all(r.status in ("pass", "xfail", "skip") for r in records)

``hypothesis_samples(entry, n)`` is the CLI's ``--config hypothesis``: the first ``n`` distinct draws of
a derandomised run, named ``hypothesis:0`` … — the same on every run with the same hypothesis release,
so each is reproducible from its repro line.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from moeconf.hf.configs import tiny_values, varied_rules
from moeconf.registry.config_space import ConfigSample
from moeconf.registry.entry import ArchEntry

MAX_EXPERTS = 16
"""Largest drawn expert count: enough for 4 groups of 4 and for k well below E, small enough that a
draw costs what the tiny config costs."""

BIAS_OFFSETS = (-4.0, -1.0, 0.0, 1.0, 4.0)
BIAS_SCALES = (0.05, 0.5, 2.0)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def config_samples(entry: ArchEntry) -> st.SearchStrategy[ConfigSample]:
    """Valid config samples of ``entry`` (kind ``hypothesis``)."""
    rules = varied_rules(entry)
    field = {r.target: r.field for r in rules}
    tiny = tiny_values(entry)
    has_bias = entry.spec.router.selection_bias

    @st.composite
    def draw(draw: Any) -> ConfigSample:
        values: dict[str, Any] = {}
        experts = int(tiny[field["num_experts"]]) if "num_experts" in field else entry.spec.num_experts
        if "num_experts" in field:
            experts = draw(st.integers(2, MAX_EXPERTS))
            values[field["num_experts"]] = experts
        reachable = experts
        if "n_group" in field:
            group = entry.spec.router.group_limit
            least = 2 if group is not None and group.score == "top2sum" else 1  # a top-2 sum needs 2 per group
            n_group = draw(st.sampled_from([d for d in _divisors(experts) if experts // d >= least]))
            values[field["n_group"]] = n_group
            if "topk_group" in field:
                topk_group = draw(st.integers(1, n_group))
                values[field["topk_group"]] = topk_group
                reachable = topk_group * (experts // n_group)
        elif "topk_group" in field:
            values[field["topk_group"]] = 1
        if "top_k" in field:
            values[field["top_k"]] = draw(st.integers(1, reachable + entry.spec.identity_experts))
        for rule in rules:
            target, name = rule.target, rule.field
            if name in values:
                continue
            if target == "renorm":
                values[name] = draw(st.booleans())
            elif target == "pnorm":
                # None (no renormalisation) is what the modeling code allows, but DBRX's typed config refuses it
                values[name] = draw(st.sampled_from((1.0, 2.0, 3.0)))
            elif target == "routed_scaling":
                values[name] = draw(st.sampled_from((1.0, 0.5, 2.5, 16.0)))
            elif target == "shared_intermediate":
                values[name] = draw(st.integers(1, 32))
            elif target == "selected_logits_fn":
                values[name] = draw(st.sampled_from(("softmax", "sigmoid")))
            elif target == "shared_slots":
                values[name] = draw(st.integers(1, 3))
            elif target == "topk_method":
                values[name] = draw(st.sampled_from(("group_limited_greedy", "greedy")))
            elif target == "shared_multiple":
                values[name] = draw(st.integers(1, 3))
            elif target == "expert_capacity":
                values[name] = draw(st.integers(1, 8))
            elif target == "logit_softcap":
                values[name] = draw(st.sampled_from((None, 1.0, 5.0, 30.0)))
            elif target == "swiglu_limit":
                values[name] = draw(st.sampled_from((7.0, 1.0, 3.0, 10.0)))
            elif target == "swiglu_alpha":
                values[name] = draw(st.sampled_from((1.702, 1.0, 2.5)))
            elif target == "sparsemixer_eps":
                values[name] = draw(st.sampled_from((0.01, 0.1, 0.3)))
            elif target == "logit_softcap_or_zero":
                values[name] = draw(st.sampled_from((0.0, 1.0, 5.0, 30.0)))
            elif target == "scoring":
                # NOTE: DeepSeek-V4 documents "softmax" too, which ACT2FN lacks (the router cannot be built)
                values[name] = draw(st.sampled_from(("sigmoid", "sqrtsoftplus")))
            elif target == "shared_swiglu_limit":
                values[name] = draw(st.sampled_from((7.0, 1.0, 3.0, 10.0)))
            elif target == "shared_swiglu_alpha":
                values[name] = draw(st.sampled_from((1.702, 1.0, 2.5)))
            elif target in ("softcap_gate", "softcap_up"):
                values[name] = draw(st.sampled_from((1.0, 1.5, 4.0, 25.0)))
            elif target == "renorm_eps":
                values[name] = draw(st.sampled_from((1e-12, 1e-6, 0.5)))  # 0.5: above many tokens' top-k sum
            elif target == "logit_multiplier":
                values[name] = draw(st.sampled_from((1.0, 0.5, 2.0, 8.0)))
            elif target == "shared_combine":
                values[name] = draw(st.sampled_from(("sum", "average")))
            elif target == "capacity_normalize_before_dropping":
                values[name] = draw(st.booleans())
        bias = None
        if has_bias:
            bias = (draw(st.sampled_from(BIAS_OFFSETS)), draw(st.sampled_from(BIAS_SCALES)))
            if bias == (0.0, 0.05):
                bias = None  # the usual draw
        return ConfigSample("hypothesis", "hypothesis", tuple(values.items()), bias=bias)

    return draw()


def hypothesis_samples(entry: ArchEntry, count: int) -> tuple[ConfigSample, ...]:
    """The first ``count`` distinct samples of a derandomised draw, then as many more of the same draw as it
    takes for every routing field to take a value other than its tiny one (the coverage rule); named
    ``hypothesis:<i>`` in that order.

    NOTE: hypothesis has no public "draw n examples from a seed" call; a derandomised ``@given`` run
    that only collects its examples is the supported way to get the same draws on every run.
    """
    pool: list[ConfigSample] = []
    strategy = config_samples(entry)

    @settings(
        max_examples=max(40, 10 * count),
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(sample: ConfigSample) -> None:
        if all(sample.values != s.values or sample.bias != s.bias for s in pool):
            pool.append(sample)

    collect()
    chosen = pool[:count]
    tiny = tiny_values(entry)
    for name in tiny:
        if any(dict(s.values).get(name, tiny[name]) != tiny[name] for s in chosen):
            continue
        other = next((s for s in pool if dict(s.values).get(name, tiny[name]) != tiny[name]), None)
        if other is not None and other not in chosen:
            chosen.append(other)
    return tuple(ConfigSample(f"hypothesis:{i}", "hypothesis", s.values, bias=s.bias) for i, s in enumerate(chosen))


__all__ = ["config_samples", "hypothesis_samples"]
