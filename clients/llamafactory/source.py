"""Where in LLaMA-Factory's source a finding points: the model-type branches of a function, read with ``ast``."""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass
from pathlib import Path

TYPE_NAMES = ("model_type", "text_model_type", "text_config")
"""Names in a branch test that compare a model type with strings: the model's own, or its text model's."""


@dataclass(frozen=True)
class Branch:
    """One ``if``/``elif`` of a function that compares model types with strings.

    Attributes:
        model_types: the strings compared with the model's own type (``model_type == "dbrx"``).
        text_types: the strings compared with its text model's type (``text_model_type``, ``text_config``).
        line: the ``if`` line.
        body: ``(line, source)`` of each statement in the branch (what it does for those types).
    """

    model_types: tuple[str, ...]
    text_types: tuple[str, ...]
    line: int
    body: tuple[tuple[int, str], ...]


def _compared(test: ast.expr) -> tuple[list[str], list[str]]:
    """Strings each ``Compare`` of ``test`` checks a model type against, split by whose type it is."""
    own: list[str] = []
    text: list[str] = []
    for node in ast.walk(test):
        if not isinstance(node, ast.Compare):
            continue
        names = {n.id for n in ast.walk(node.left) if isinstance(n, ast.Name)}
        if not names & set(TYPE_NAMES):
            continue
        strings = [
            c.value
            for comp in node.comparators
            for c in ast.walk(comp)
            if isinstance(c, ast.Constant) and isinstance(c.value, str)
        ]
        (text if names & {"text_model_type", "text_config"} else own).extend(strings)
    return own, text


def branches(fn: object) -> list[Branch]:
    """Every ``if``/``elif`` in ``fn`` whose test compares a model type with string constants."""
    source_lines, first = inspect.getsourcelines(fn)  # type: ignore[arg-type]
    text = "".join(source_lines)
    out = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.If):
            continue
        own, text_types = _compared(node.test)
        if not own and not text_types:
            continue
        body = tuple((first + s.lineno - 1, ast.get_source_segment(text, s) or "") for s in node.body)
        out.append(Branch(tuple(own), tuple(text_types), first + node.lineno - 1, body))
    return sorted(out, key=lambda b: b.line)


def handled(fn: object) -> tuple[set[str], set[str]]:
    """``(model types, text model types)`` that ``fn`` has a branch for."""
    found = branches(fn)
    return {t for b in found for t in b.model_types}, {t for b in found for t in b.text_types}


def relative_file(fn: object, root: Path) -> str:
    """``llamafactory/...py`` of ``fn`` inside the unpacked wheel."""
    return Path(inspect.getsourcefile(fn)).resolve().relative_to(root.resolve()).as_posix()  # type: ignore[arg-type]


def evidence(fn: object, root: Path, model_type: str, text_type: str | None) -> list[str]:
    """``file:line: source`` of every branch of ``fn`` naming ``model_type`` (or ``text_type`` for a
    text-config branch), its test and its statements."""
    path = relative_file(fn, root)
    lines = []
    for b in branches(fn):
        if model_type in b.model_types or (text_type is not None and text_type in b.text_types):
            names = [*b.model_types, *(f"text {t}" for t in b.text_types)]
            lines.append(f"{path}:{b.line}: branch for {', '.join(names)}")
            lines += [f"{path}:{ln}: {src.splitlines()[0]}" for ln, src in b.body]
    return lines


def definition(fn: object, root: Path) -> str:
    """``file:line`` of ``fn``'s ``def``."""
    _, first = inspect.getsourcelines(fn)  # type: ignore[arg-type]
    return f"{relative_file(fn, root)}:{first}"


def line_of(fn_module_file: Path, root: Path, needle: str) -> list[str]:
    """``file:line`` of each line of a module containing ``needle``."""
    path = fn_module_file.resolve().relative_to(root.resolve()).as_posix()
    text = fn_module_file.read_text().splitlines()
    return [f"{path}:{i}: {line.strip()}" for i, line in enumerate(text, 1) if needle in line]


def branches_setting(fn: object, root: Path, needle: str) -> list[str]:
    """``file:line`` of every branch of ``fn`` with a statement mentioning ``needle``, and the types it names."""
    path = relative_file(fn, root)
    return [
        f"{path}:{b.line}: {needle} set only for {', '.join([*b.model_types, *(f'text {t}' for t in b.text_types)])}"
        for b in branches(fn)
        if any(needle in src for _, src in b.body)
    ]
