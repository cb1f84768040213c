"""moeconf's packages import only downwards: the allowed directions are written here, and every import
in the source (module level or inside a function) must follow them."""

from __future__ import annotations

import ast
from pathlib import Path

import moeconf

ROOT = Path(moeconf.__file__).parent

# Each unit and the units it may import. Leaves (spec, params, devices) import no moeconf unit.
ALLOWED: dict[str, set[str]] = {
    "spec": set(),
    "params": {"spec"},
    "devices": set(),
    "reference": {"spec", "params"},
    "registry": {"spec", "params"},
    "npu": set(),
    "distributed": set(),
    "hf": {"registry", "params", "spec"},
    "backends": {"hf", "registry", "params", "spec", "devices", "npu", "distributed"},
    "harness": {"backends", "reference", "registry", "params", "spec", "devices", "hf", "strategies"},
    "strategies": {"hf", "registry", "spec"},
    "suites": {"harness", "backends", "registry", "devices", "distributed"},
    "tools": {"harness", "backends", "hf", "reference", "registry", "params", "spec", "devices"},
    "bench": {"harness", "backends", "hf", "reference", "registry", "params", "spec", "devices", "distributed"},
    "integration": {"tools", "harness", "hf", "reference", "registry", "params", "spec"},
    "cli": {"tools", "bench", "harness", "backends", "registry", "devices", "distributed"},
    "__main__": {"cli"},
    "partition": {"cli", "harness", "backends", "registry", "devices", "distributed"},
    "pytest_plugin": {"suites", "harness", "backends", "registry", "devices"},
    "__init__": set(),
}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> dict[tuple[str, str], list[str]]:
    """(from unit, to unit) → where."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts)
        src = _unit(module if path.name != "__init__.py" else module.removesuffix(".__init__"))
        if path.name == "__init__.py" and rel.parent == Path("moeconf"):
            src = "__init__"
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "moeconf"]
            for name in names:
                if name == "moeconf" or not name.startswith("moeconf."):
                    continue
                dst = _unit(name)
                if dst != src:
                    edges.setdefault((src, dst), []).append(f"{rel}:{node.lineno}")
    return edges


def test_every_unit_is_declared() -> None:
    units = {
        p.stem if p.is_file() else p.name for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    assert units <= set(ALLOWED), f"undeclared units: {sorted(units - set(ALLOWED))}"


def test_imports_point_down() -> None:
    wrong = [
        f"{src} -> {dst} ({', '.join(where[:3])})"
        for (src, dst), where in sorted(_imports().items())
        if dst not in ALLOWED.get(src, set())
    ]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_allowed_directions_have_no_cycle() -> None:
    state: dict[str, int] = {}

    def visit(unit: str, path: list[str]) -> None:
        if state.get(unit) == 1:
            raise AssertionError(f"cycle: {' -> '.join(path + [unit])}")
        if state.get(unit) == 2:
            return
        state[unit] = 1
        for nxt in sorted(ALLOWED[unit]):
            visit(nxt, path + [unit])
        state[unit] = 2

    for unit in ALLOWED:
        visit(unit, [])
