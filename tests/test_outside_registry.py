"""Architectures registered from outside (``--registry package.module:attr``, the
``moeconf.architectures`` entry points) are looked up, listed and checked like the built-in ones;
every way of getting it wrong is one usage line, exit 2."""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Iterator
from importlib.metadata import EntryPoint

import pytest

from moeconf import cli
from moeconf.cli import main
from moeconf.registry import REGISTRY, UnknownName, all_entries, get_entry, outside
from moeconf.registry.outside import RegistryLoadError, load_registry, scoped

# A framework's own entries: the Mixtral block under framework-owned names (the data moeconf needs).
OUTSIDE_MIXTRAL = dataclasses.replace(REGISTRY["mixtral"], model_type="outside_mixtral")
OUTSIDE_QWEN = dataclasses.replace(REGISTRY["qwen3_moe"], model_type="outside_qwen3_moe")
ARCHITECTURES = (OUTSIDE_MIXTRAL, OUTSIDE_QWEN)
BY_NAME = {e.model_type: e for e in ARCHITECTURES}
CLASHING = (OUTSIDE_MIXTRAL, REGISTRY["mixtral"])
OTHER_OUTSIDE_MIXTRAL = dataclasses.replace(OUTSIDE_MIXTRAL)  # same name, another entry
EMPTY: tuple[object, ...] = ()
NOT_ENTRIES = ("mixtral",)
HERE = "tests.test_outside_registry"
ONE_CASE = ["--case", "random"]


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    """Each test starts with no outside entry and leaves none behind."""
    with scoped():
        outside._OUTSIDE.clear()
        outside._ORIGIN.clear()
        outside._ENTRY_POINTS_LOADED = False
        yield


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_registered_entries_are_found_by_name_and_listed_after_the_built_ins() -> None:
    assert load_registry(f"{HERE}:ARCHITECTURES") == ARCHITECTURES
    assert get_entry("outside_mixtral") is OUTSIDE_MIXTRAL
    assert list(all_entries())[-2:] == ["outside_mixtral", "outside_qwen3_moe"]
    assert load_registry(f"{HERE}:OUTSIDE_MIXTRAL") == (OUTSIDE_MIXTRAL,)  # the same entry again: a no-op
    assert load_registry(f"{HERE}:BY_NAME") == ARCHITECTURES  # a mapping counts by its values


def test_check_runs_an_outside_architecture_and_forgets_it_afterwards(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--registry", f"{HERE}:ARCHITECTURES", "--arch", "outside_mixtral", *ONE_CASE]) == 0
    out = capsys.readouterr().out
    assert "outside_mixtral" in out and " 0 fail" in out
    with pytest.raises(UnknownName):  # main()'s --registry does not outlive the call
        get_entry("outside_mixtral")


def test_a_failing_outside_record_carries_a_repro_that_finds_the_registry(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["check", "--registry", f"{HERE}:ARCHITECTURES", "--arch", "outside_mixtral"]
    assert main([*argv, "--backend", "tests.seeded:gate_up_swapped", *ONE_CASE, "--check", "output"]) == 1
    repro = next(line.split("repro: ", 1)[1] for line in capsys.readouterr().out.splitlines() if "repro: " in line)
    assert repro.startswith(f"moeconf --registry {HERE}:ARCHITECTURES check --arch outside_mixtral ")
    assert main(shlex.split(repro)[1:]) == 1  # the repro line, as written, reruns the red record
    assert "FAIL outside_mixtral" in capsys.readouterr().out


def test_default_selection_and_list_include_outside_entries(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--registry", f"{HERE}:ARCHITECTURES", "--backend", "hf-eager"]) == 0
    out = capsys.readouterr().out
    assert "outside_qwen3_moe" in out and "2 from outside registries" in out
    args = cli._parser().parse_args(["--registry", f"{HERE}:OUTSIDE_MIXTRAL", "check"])
    assert cli._load_registries(args, "moeconf") == f"moeconf --registry {HERE}:OUTSIDE_MIXTRAL"
    selection, _, _ = cli._selection(args, "moeconf")
    assert selection.archs == (*REGISTRY, "outside_mixtral")


def test_an_outside_entry_may_fill_a_declared_unsupported_type() -> None:
    from moeconf.tools.coverage import DECLARED_UNSUPPORTED

    name = min(DECLARED_UNSUPPORTED)
    outside.register([dataclasses.replace(OUTSIDE_MIXTRAL, model_type=name)], "test")
    args = cli._parser().parse_args(["check", "--arch", name])
    assert cli._selection(args, "moeconf")[0].archs == (name,)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (f"{HERE}:CLASHING", "'mixtral' is a built-in moeconf architecture"),
        ("no_such_module_xyz:ENTRIES", "No module named 'no_such_module_xyz'"),
        (f"{HERE}:NOPE", "has no attribute 'NOPE'"),
        (HERE, "expected package.module:attr"),
        (f"{HERE}:NOT_ENTRIES", "item 0 is a str, not a moeconf.registry.ArchEntry"),
        (f"{HERE}:EMPTY", "registers no architecture"),
        (f"{HERE}:HERE", "it is a str, expected an ArchEntry or an iterable of them"),
        ("tests.test_outside_registry:main", "it is a function"),
    ],
)
def test_a_bad_registry_is_one_usage_line(spec: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--registry", spec, "--arch", "mixtral"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("moeconf: error: ") and expected in line and spec in line


def test_the_same_name_from_two_registries_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--registry", f"{HERE}:ARCHITECTURES", "list", "--registry", f"{HERE}:OTHER_OUTSIDE_MIXTRAL"]
    assert main(argv) == 2
    assert f"'outside_mixtral' is already registered by {HERE}:ARCHITECTURES" in _one_error_line(capsys)
    assert outside.outside_entries() == {}  # nothing half-registered


def test_every_subcommand_that_takes_arch_takes_registry(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["check"], ["list"], ["bench", "--arch", "mixtral"]):
        assert main([*command, "--registry", "no_such_module_xyz:E"]) == 2, command
        assert "no_such_module_xyz" in _one_error_line(capsys)


def _entry_points(*values: str) -> list[EntryPoint]:
    return [EntryPoint(name=f"fw{i}", value=v, group=outside.ENTRY_POINT_GROUP) for i, v in enumerate(values)]


def test_entry_points_register_on_first_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outside, "entry_points", lambda group: _entry_points(f"{HERE}:ARCHITECTURES"))
    assert get_entry("outside_qwen3_moe") is OUTSIDE_QWEN
    assert outside.origin("outside_qwen3_moe") == "entry point fw0"
    assert outside.registry_spec("outside_qwen3_moe") is None  # installed: a repro needs no --registry
    load_registry(f"{HERE}:ARCHITECTURES")  # naming what an entry point registered is fine


def test_a_broken_or_clashing_entry_point_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(outside, "entry_points", lambda group: _entry_points("no_such_module_xyz:E"))
    with pytest.raises(RegistryLoadError, match="cannot load entry point 'fw0'.*ModuleNotFoundError"):
        get_entry("outside_mixtral")
    monkeypatch.setattr(outside, "entry_points", lambda group: _entry_points(f"{HERE}:CLASHING"))
    assert main(["check", "--arch", "mixtral"]) == 2
    assert "entry point fw0: model type 'mixtral' is a built-in" in _one_error_line(capsys)
