"""The config space: the spec derived from the config, the samples, the coverage rule, and seeded bugs
that hard-code the tested value (invisible at the tiny config, red at the sample that exposes them)."""

from __future__ import annotations

import dataclasses

import pytest

from moeconf.harness.checks import CHECKS
from moeconf.harness.engine import CheckResult, Selection, run_arch, run_selection
from moeconf.harness.partition_checks import PARTITION_CHECKS
from moeconf.harness.rejection import REJECTION_CHECK
from moeconf.harness.samples import UnknownConfig, check_selectors, samples
from moeconf.hf.block import block_config, build_config
from moeconf.hf.configs import at_config, field_rules, invalid_samples, values_of, varied_rules
from moeconf.registry import REGISTRY, Expectation, get_entry
from moeconf.registry.config_space import TINY, ConfigSample, FieldRule, InvalidConfig, derive_spec
from moeconf.registry.entry import CHECK_NAMES
from moeconf.registry.versions import absent_reason
from tests.records import red
from tests.seeded_config import SEEDED_CONFIG

pytestmark = pytest.mark.skipif(
    any(absent_reason(a) for a in ("qwen3_moe", "deepseek_v3", "dbrx")), reason="5.x registry"
)

ARCHS = sorted(a for a in REGISTRY if absent_reason(a) is None)


def test_declarations_name_checks_the_harness_has() -> None:
    assert set(CHECKS) | set(PARTITION_CHECKS) | {"config_leaf", "config_aux_loss", REJECTION_CHECK} == CHECK_NAMES
    with pytest.raises(ValueError, match="unknown check 'routing_weight'"):
        Expectation("xfail", "typo", check="routing_weight")


def test_a_field_left_out_needs_its_reason() -> None:
    with pytest.raises(ValueError, match="needs its reason"):
        FieldRule("norm_topk_prob", None)
    with pytest.raises(ValueError, match="unknown target"):
        FieldRule("norm_topk_prob", "renormalise")  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ARCHS)
def test_the_tiny_config_derives_the_registered_spec(arch: str) -> None:
    """The migration changed no expectation: config → spec gives back every hand-written spec."""
    entry = get_entry(arch)
    config = block_config(entry, build_config(entry))
    assert derive_spec(entry.spec, field_rules(entry), config) == entry.spec


def _values(arch: str, kinds: tuple[str, ...]) -> dict[str, list[object]]:
    entry = get_entry(arch)
    seen: dict[str, list[object]] = {r.field: [] for r in varied_rules(entry)}
    for sample in samples(entry, kinds):
        try:
            values = values_of(entry, sample)
        except InvalidConfig:  # a class default that describes no layer: judged by config_rejects_invalid
            continue
        for name, value in values.items():
            if value not in seen[name]:
                seen[name].append(value)
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_every_routing_field_is_exercised_at_two_values(arch: str) -> None:
    """The coverage rule: across tiny, default, published and hypothesis, each routing field of each
    entry takes at least two values (the class default and the published ones are among the samples)."""
    seen = _values(arch, ("tiny", "default", "published", "hypothesis"))
    single = {name: values for name, values in seen.items() if len(values) < 2}
    assert not single, f"{arch}: routing fields exercised at one value only: {single}"


def test_hypothesis_samples_are_reproducible_by_name() -> None:
    entry = get_entry("deepseek_v3")
    first = samples(entry, ("hypothesis",))
    assert [s.name for s in first] == [f"hypothesis:{i}" for i in range(len(first))]
    assert samples(entry, ("hypothesis:2",)) == [first[2]]
    assert samples(entry, ("hypothesis",)) == first  # derandomised: the same draws on every run


def test_a_sample_name_is_checked_before_anything_runs() -> None:
    check_selectors(["tiny", "published:qwen3-30b-a3b", "hypothesis:3", "invalid:kept"])
    for bad in ("tiny:x", "hypothesis:two", "random"):
        with pytest.raises(UnknownConfig, match="unknown --config"):
            check_selectors([bad])


def test_records_and_repro_lines_name_the_config() -> None:
    sel = Selection(archs=("mixtral",), configs=("hypothesis:1",), cases=("random",), checks=("output",))
    records = [r for group in run_selection(sel) for r in group]
    assert records and {r.config for r in records} == {"hypothesis:1"}
    assert all("--config hypothesis:1" in r.repro for r in records)


def test_an_invalid_config_is_invalid_for_the_reference() -> None:
    entry = get_entry("deepseek_v3")
    names = [s.name for s in invalid_samples(entry)]
    assert names == ["invalid:top_k", "invalid:n_group", "invalid:topk_group", "invalid:kept"]
    for sample in invalid_samples(entry):
        with pytest.raises(InvalidConfig):
            at_config(entry, sample)


def _at(arch: str, backend: str, sample: ConfigSample) -> list[CheckResult]:
    from moeconf.backends import resolve_backend

    entry = at_config(get_entry(arch), sample)
    sel = Selection(archs=(arch,), backends=(backend,))
    records = [r for group in run_arch(sel, entry, {backend: resolve_backend(backend)}, "fp32") for r in group]
    errors = [f"{r.case} {r.check}: {r.message}" for r in records if r.status == "error"]
    assert records and not errors, errors[:3]
    return records


@pytest.mark.parametrize("bug", sorted(SEEDED_CONFIG))
def test_a_hard_coded_value_passes_at_tiny_and_fails_at_the_sample_that_exposes_it(bug: str) -> None:
    arch, sample, must_fail = SEEDED_CONFIG[bug]
    backend = f"tests.seeded_config:{bug}"
    assert red(_at(arch, backend, TINY)) == set(), f"{bug} is visible at the tiny config already"
    assert red(_at(arch, "hf-eager", sample)) == set(), f"{arch} is not green at {sample.name} without the bug"
    failing = red(_at(arch, backend, sample))
    assert must_fail <= failing, f"{bug} at {sample.name}: expected {must_fail} red, got {failing}"


def test_a_block_that_accepts_an_invalid_config_fails_the_rejection_check() -> None:
    """DeepSeek-V3's router fills the dropped groups with -inf and takes top-k anyway: k beyond the kept
    groups' experts picks masked experts in silence. qwen3_moe's torch.topk refuses k > E."""
    sel = Selection(archs=("qwen3_moe",), configs=("invalid",))
    records = [r for group in run_selection(sel) for r in group]
    assert [(r.config, r.check, r.status) for r in records] == [("invalid:top_k", REJECTION_CHECK, "pass")]
    assert "rejected by the block" in records[0].message


def test_a_declared_xfail_out_of_reach_at_a_drawn_config_is_not_a_stale_declaration() -> None:
    """DeepSeek-V2 ignores norm_topk_prob: declared for norm_topk_prob=True only (``when``); with k = E its
    softmax weights already sum to 1, so at a drawn sample the bug may not show (a pass, not a fail)."""
    entry = get_entry("deepseek_v2")
    off = at_config(entry, ConfigSample("hypothesis:x", "hypothesis", (("norm_topk_prob", False),)))
    assert not any(x.check == "output" for x in off.expectations)
    on = at_config(entry, ConfigSample("hypothesis:y", "hypothesis", (("norm_topk_prob", True),)))
    assert any(x.check == "output" and x.status == "xfail" for x in on.expectations)
    assert dataclasses.replace(entry).expectations == entry.expectations


PROPERTY_ARCHS = ("qwen3_moe", "deepseek_v3", "dbrx", "gpt_oss")
"""One entry of each router family with the most routing fields: softmax + renorm flag, group-limited
sigmoid with a selection bias, p-norm, top-k-then-softmax with a clamped GLU."""


@pytest.mark.parametrize("arch", PROPERTY_ARCHS)
def test_every_drawn_config_agrees_with_the_reference(arch: str) -> None:
    """Property-based: hypothesis draws configs (``moeconf.strategies``) and shrinks a failing one to the
    smallest config that still fails; its repro line is printed with the records."""
    from hypothesis import HealthCheck, given, settings

    from moeconf.backends import resolve_backend
    from moeconf.strategies import config_samples

    entry = get_entry(arch)
    backend = resolve_backend("hf-eager")

    @settings(max_examples=6, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(config_samples(entry))
    def agrees(sample: ConfigSample) -> None:
        variant = at_config(entry, sample)
        sel = Selection(archs=(arch,), configs=(sample.name,))
        records = [r for group in run_arch(sel, variant, {"hf-eager": backend}, "fp32") for r in group]
        bad = [f"{r.status} {r.case}/{r.check}: {r.message}" for r in records if r.status in ("fail", "error")]
        assert not bad, f"{sample.describe()}:\n" + "\n".join(bad[:5])

    agrees()


def test_the_rejection_check_goes_red_on_a_block_that_accepts_an_invalid_config() -> None:
    """The failing side of config_rejects_invalid: DeepSeek-V3's block computes an output for k beyond the kept
    groups' experts (declared upstream, so the registry records it xfail); the check itself says fail."""
    from moeconf.harness.rejection import rejection_outcome
    from moeconf.hf.configs import probe_at

    entry = get_entry("deepseek_v3")
    sample = next(s for s in invalid_samples(entry) if s.name == "invalid:kept")
    probe, config_error = probe_at(entry, sample)
    assert config_error is None  # the config class lets it through
    outcome = rejection_outcome(probe, config_error, "k beyond the kept groups", str)
    assert outcome.passed is False and "accepted a config that describes no valid layer" in outcome.message
