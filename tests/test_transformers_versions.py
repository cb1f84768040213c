"""Release ranges (``moeconf.registry.versions``): a model type the installed transformers lacks is a
``skip`` naming the release that added it; expectations and entry overrides hold only in their range.

Runs on the dev venv (the newest transformers) by faking the installed release.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version

from moeconf.backends.base import Observation
from moeconf.backends.hf import HFBlockBackend, guarded_losses
from moeconf.cli import main
from moeconf.harness.engine import Selection, run_arch, run_selection
from moeconf.hf.block import framework_losses
from moeconf.registry import REGISTRY, ArchEntry, Expectation, versions
from moeconf.registry.legacy import RELEASE_OVERRIDES, apply_overrides, for_installed_release

OLD = Version("5.6.2")


@pytest.fixture
def fake_release(monkeypatch: pytest.MonkeyPatch):
    """Pretend the installed transformers is ``release``."""

    def fake(release: Version) -> None:
        monkeypatch.setattr(versions, "installed", lambda: release)

    return fake


def test_absent_type_reason_names_installed_and_first_release(fake_release) -> None:
    fake_release(OLD)
    assert versions.absent_reason("lara_mini") == "model type lara_mini is not in transformers 5.6.2 (added in 5.24.0)"
    assert versions.absent_reason("hy_v3") is None  # added in 5.6.0: present
    assert versions.absent_reason("mixtral") is None  # in the baseline
    assert versions.absent_reason("no_such_type") is None  # outside types: nothing known, nothing claimed


def test_absent_type_is_skipped_not_errored(fake_release) -> None:
    fake_release(OLD)
    sel = Selection(archs=("lara_mini",), cases=("random",), checks=("output", "routing"))
    records = [r for group in run_selection(sel) for r in group]
    assert records and {r.status for r in records} == {"skip"}
    assert all("not in transformers 5.6.2 (added in 5.24.0)" in r.message for r in records)


def test_present_type_still_runs_under_the_real_release() -> None:
    sel = Selection(archs=("lara_mini",), cases=("random",), checks=("output",))
    assert {r.status for group in run_selection(sel) for r in group} == {"pass"}


def test_release_ranges() -> None:
    assert versions.in_releases(">=5.0,<5.13", OLD)
    assert not versions.in_releases(">=5.0,<5.13", Version("5.13.0"))
    # PEP 440: "<5.13" excludes 5.13's own pre-releases, so a dev build of the fixed release is not "before" it.
    assert not versions.in_releases("<5.13", Version("5.13.0.dev0"))
    assert versions.in_releases(None, OLD)
    for bad in ("five", ""):
        with pytest.raises(ValueError):
            versions.release_range(bad)


def test_expectation_holds_only_in_its_release_range(fake_release) -> None:
    declared = Expectation("xfail", "upstream: example", check="aux_loss", releases=">=5.0,<5.18")
    fake_release(OLD)
    assert declared.matches("aux_loss", "hf-eager", "fp32", "cpu")
    assert not declared.matches("output", "hf-eager", "fp32", "cpu")
    fake_release(Version("5.18.0"))
    assert not declared.matches("aux_loss", "hf-eager", "fp32", "cpu")
    with pytest.raises(ValueError):
        Expectation("xfail", "upstream: example", releases="not a range")


def test_release_overrides_apply_only_in_range(fake_release) -> None:
    entry = REGISTRY["granitemoe"]
    assert for_installed_release(entry) is entry  # the dev venv is past every granite override
    fake_release(OLD)
    old = for_installed_release(entry)
    assert old.routing_from == "router_grouped" and old.experts_path == ""
    assert {b.path for b in old.params} == {"router.layer.weight", "input_linear.weight", "output_linear.weight"}
    assert old.spec == entry.spec  # the block computes the same thing; only where it keeps it moved


def test_every_override_names_a_registered_type() -> None:
    assert set(RELEASE_OVERRIDES) <= set(REGISTRY)


def test_added_in_agrees_with_the_installed_transformers() -> None:
    """Every type the table says the installed release has is really there (CONFIG_MAPPING), and no
    registered type is missing from a release the table claims it runs on."""
    from transformers import CONFIG_MAPPING

    installed = Version(transformers.__version__)
    for model_type in REGISTRY:
        first = Version(versions.added_in(model_type) or versions.BASELINE)
        assert (model_type in CONFIG_MAPPING) == (installed >= first), model_type


def _wheel(path: Path, release: str, model_types: list[str]) -> str:
    wheel = path / f"transformers-{release}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for t in model_types:
            zf.writestr(f"transformers/models/{t}/configuration_{t}.py", f'class C:\n    model_type = "{t}"\n')
    return str(wheel)


def test_added_in_is_derived_from_wheels(tmp_path: Path) -> None:
    wheels = [
        _wheel(tmp_path, "5.0.0", ["mixtral"]),
        _wheel(tmp_path, "5.10.1", ["mixtral", "mellum"]),
        _wheel(tmp_path, "5.9.0", ["mixtral"]),
    ]
    # 5.10.1 sorts after 5.9.0 as a release, not as a string.
    assert versions.derive_added_in(wheels, ["mixtral", "mellum", "lara_mini"]) == {"mellum": "5.10.1"}


def test_list_shows_releases_and_absent_types(fake_release, capsys: pytest.CaptureFixture[str]) -> None:
    fake_release(OLD)
    assert main(["list", "--backend", "hf-eager", "--format", "json"]) == 0
    rows = {row["model_type"]: row for row in json.loads(capsys.readouterr().out)["architectures"]}
    assert rows["lara_mini"]["transformers"] == ">=5.24.0"
    assert rows["mixtral"]["transformers"] == ">=4.55.0"  # it has a 4.x variant (LEGACY_4X)
    assert rows["qwen2_moe"]["transformers"] == ">=5.0.0"
    assert rows["lara_mini"]["backends"]["hf-eager"]["status"] == "unsupported"
    assert "added in 5.24.0" in rows["lara_mini"]["backends"]["hf-eager"]["reason"]


# -- the framework's own loss computation raising (Qwen3-Next / Qwen3-Omni thinker on 5.0-5.1) ------------


class _LossRaises(HFBlockBackend):
    """The block as shipped, but the model's loss code raises (as 5.0's did on Qwen3-Next)."""

    def losses(self, entry, rec, attention_mask):
        raise RuntimeError("Class values must be smaller than num_classes.")


def _arch_records(backend: HFBlockBackend, entry: ArchEntry) -> list:
    sel = Selection(archs=(entry.model_type,), backends=(backend.name,), cases=("random",))
    return [r for group in run_arch(sel, entry, {backend.name: backend}, "fp32") for r in group]


def test_a_raising_loss_fails_only_the_loss_checks() -> None:
    """The loss code raising is the losses' fault: the output, routing and gradients are still judged."""
    entry = REGISTRY["mixtral"]
    records = _arch_records(_LossRaises("loss-raises"), entry)
    by_check = {r.check: r for r in records}
    assert {r.status for r in records if r.check not in ("aux_loss", "grad_aux_loss")} == {"pass"}
    for check in ("aux_loss", "grad_aux_loss"):
        assert by_check[check].status == "fail"
        assert "raised RuntimeError: Class values must be smaller than num_classes." in by_check[check].message
    declared = dataclasses.replace(
        entry, expectations=(Expectation("xfail", "upstream: example", check="aux_loss"),) + entry.expectations
    )
    assert {r.check: r.status for r in _arch_records(_LossRaises("loss-raises"), declared)}["aux_loss"] == "xfail"


def test_guarded_losses_names_what_raised_for_every_loss_of_the_architecture() -> None:
    """The 5.0 Qwen3-Next bug itself: the block's [N, H] output recorded as router logits (H > E)."""
    entry = REGISTRY["qwen3_next"]
    hidden = torch.randn(6, entry.spec.hidden)
    assert entry.spec.hidden > entry.spec.num_experts
    mask = torch.ones(1, 6, dtype=torch.long)
    aux, z, errors = guarded_losses(entry, lambda: framework_losses(entry, [hidden], mask))
    assert aux is None and z is None and set(errors) == {"aux_loss"}
    assert errors["aux_loss"].startswith("RuntimeError: ") and " at " in errors["aux_loss"]
    assert guarded_losses(entry, lambda: (torch.tensor(1.0), None)) == (torch.tensor(1.0), None, {})


def test_loss_errors_must_name_a_loss() -> None:
    from moeconf.backends.base import RunRequest
    from moeconf.harness.validate import MalformedObservation, validate_observation

    request = RunRequest(
        entry=REGISTRY["mixtral"],
        params={},
        hidden=torch.zeros(1, 2, REGISTRY["mixtral"].spec.hidden),
        grad_output=torch.zeros(1, 2, REGISTRY["mixtral"].spec.hidden),
        attention_mask=torch.ones(1, 2, dtype=torch.long),
        dtype=torch.float32,
        device="cpu",
    )
    obs = Observation(output=torch.zeros(1, 2, REGISTRY["mixtral"].spec.hidden))
    assert validate_observation(dataclasses.replace(obs, loss_errors={"aux_loss": "RuntimeError: x"}), request)
    for bad in ({"output": "RuntimeError: x"}, {"aux_loss": ""}, ["aux_loss"]):
        with pytest.raises(MalformedObservation, match="loss_errors"):
            validate_observation(dataclasses.replace(obs, loss_errors=bad), request)


def _declared(model_type: str, check: str = "aux_loss") -> str | None:
    expectation = for_installed_release(REGISTRY[model_type]).expectation(check, "hf-eager", "fp32", "cpu")
    return None if expectation is None else expectation.reason


@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_omni_moe_thinker", "qwen3_omni_moe"])
def test_block_output_recorded_is_declared_on_5_0_and_5_1(fake_release, model_type: str) -> None:
    for release in ("5.0.0", "5.1.0"):
        fake_release(Version(release))
        for check in ("aux_loss", "grad_aux_loss"):
            reason = _declared(model_type, check)
            # before the entry's own wider declaration (the router softmax, 5.0-5.5): it names what fails here
            assert reason and "records its MoE block's output" in reason and "fixed in 5.2.0" in reason
    fake_release(Version("5.2.0"))
    assert "records its MoE block's output" not in (_declared(model_type) or "")


@pytest.mark.parametrize(("model_type", "where"), [("jetmoe", "modeling_jetmoe.py:579"), ("glm4v_moe", ":429")])
def test_unrecorded_router_is_declared_on_5_0_and_5_1(fake_release, model_type: str, where: str) -> None:
    fake_release(Version("5.1.0"))
    reason = _declared(model_type, "grad_aux_loss")
    assert reason and where in reason and "fixed in 5.2.0" in reason
    fake_release(Version("5.2.0"))
    assert _declared(model_type) is None


def test_pad_token_id_is_named_on_5_0(fake_release) -> None:
    """5.0.0's JetMoeConfig / Qwen3VLMoeTextConfig lack pad_token_id, which the model reads."""
    fake_release(Version("5.0.0"))
    assert for_installed_release(REGISTRY["jetmoe"]).config_kwargs["pad_token_id"] is None
    vl = REGISTRY["qwen3_vl_moe"]
    text = for_installed_release(vl).config_kwargs["text_config"]
    assert text == {**vl.config_kwargs["text_config"], "pad_token_id": None}  # merged into, not replacing
    fake_release(Version("5.1.0"))
    assert "pad_token_id" not in for_installed_release(REGISTRY["jetmoe"]).config_kwargs


def test_deepseek_ocr2_runs_its_greedy_routing_before_5_13(fake_release) -> None:
    fake_release(Version("5.12.1"))
    for model_type in ("deepseek_ocr2", "deepseek_ocr2_text"):
        entry = REGISTRY[model_type]
        old = for_installed_release(entry)
        kwargs = old.config_kwargs.get("text_config", old.config_kwargs)
        assert kwargs["topk_method"] == "greedy" and old.spec.router.group_limit is None
        assert old.spec.router.scoring == entry.spec.router.scoring
    fake_release(Version("5.13.0"))
    assert for_installed_release(REGISTRY["deepseek_ocr2"]) is REGISTRY["deepseek_ocr2"]


def test_diffusion_gemma_names_its_global_kv_heads_before_5_16(fake_release) -> None:
    fake_release(Version("5.12.1"))
    text = for_installed_release(REGISTRY["diffusion_gemma"]).config_kwargs["text_config"]
    assert text["num_global_key_value_heads"] == text["num_key_value_heads"]
    assert for_installed_release(REGISTRY["diffusion_gemma_text"]).config_kwargs["num_global_key_value_heads"] == 2
    fake_release(Version("5.16.0"))
    assert for_installed_release(REGISTRY["diffusion_gemma_text"]) is REGISTRY["diffusion_gemma_text"]


def test_expectations_added_by_an_override_come_first() -> None:
    entry = REGISTRY["mixtral"]
    first = Expectation("xfail", "upstream: narrower", check="aux_loss", releases=">=5.0,<5.2")
    changed = apply_overrides(entry, {"expectations_add": (first,)})
    assert changed.expectations == (first, *entry.expectations)


# -- transformers 4.x: every type without a 4.x variant is a skip with the reason --------------------------

V4 = Version("4.57.6")


def test_types_without_a_4x_variant_are_absent_on_4x(fake_release) -> None:
    fake_release(V4)
    reason = versions.absent_reason("qwen2_moe")
    assert reason and reason.startswith("model type qwen2_moe has no transformers 4.x variant in moeconf")
    assert "mixtral" in reason  # names the types that have one
    assert versions.absent_reason("mixtral") is None
    assert "added in 5.24.0" in (versions.absent_reason("lara_mini") or "")
    assert versions.absent_reason("no_such_type") is None
    assert versions.runs_on("mixtral") == ">=4.55.0" and versions.runs_on("qwen2_moe") == ">=5.0.0"


def test_4x_registry_entries(fake_release) -> None:
    """On 4.x a type with a 4.x variant gets it (applied twice: the same); the others stay as they are."""
    fake_release(V4)
    legacy = for_installed_release(REGISTRY["mixtral"])
    assert legacy.experts_implementations == ("eager",) and legacy.routing_from == "none"
    assert for_installed_release(legacy).params == legacy.params
    assert for_installed_release(REGISTRY["qwen2_moe"]) is REGISTRY["qwen2_moe"]


def test_type_without_a_4x_variant_is_skipped_on_4x(fake_release, capsys: pytest.CaptureFixture[str]) -> None:
    fake_release(V4)
    sel = Selection(archs=("qwen2_moe",), cases=("random",), checks=("output", "aux_loss"))
    records = [r for group in run_selection(sel) for r in group]
    assert records and {r.status for r in records} == {"skip"}
    assert all("has no transformers 4.x variant in moeconf" in r.message for r in records)
    assert main(["list", "--backend", "hf-eager", "--format", "json"]) == 0
    rows = {row["model_type"]: row for row in json.loads(capsys.readouterr().out)["architectures"]}
    assert rows["qwen2_moe"]["backends"]["hf-eager"]["status"] == "unsupported"
    assert "no transformers 4.x variant" in rows["qwen2_moe"]["backends"]["hf-eager"]["reason"]
