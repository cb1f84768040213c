"""Release ranges (``moeconf.registry.versions``): a model type the installed transformers lacks is a
``skip`` naming the release that added it; expectations and entry overrides hold only in their range.

Runs on the dev venv (the newest transformers) by faking the installed release.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import transformers
from packaging.version import Version

from moeconf.cli import main
from moeconf.harness.engine import Selection, run_selection
from moeconf.registry import REGISTRY, Expectation, versions
from moeconf.registry.legacy import RELEASE_OVERRIDES, for_installed_release

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
    assert rows["mixtral"]["transformers"] == ">=5.0.0"
    assert rows["lara_mini"]["backends"]["hf-eager"]["status"] == "unsupported"
    assert "added in 5.24.0" in rows["lara_mini"]["backends"]["hf-eager"]["reason"]
