"""Reports of check records: a text summary, JSON and JUnit XML; files are written whole or not at all.

The JSON and JUnit reports keep every record with its full message (every rank's evidence of a
multi-rank failure included). The text report is for a person: a table, then one entry per root
cause (records whose status and first message line agree: for a raised exception its type, message
and location, whatever the check) as ``×N (cases …)`` with a repro per distinct
(arch, backend, dtype, device, case), multi-line evidence cut to the first failing rank's section,
skip reasons with counts, and the records the environment kept from being judged.

Root causes: every fail/error/setup record gets a ``root_cause`` id (``rc-`` + 8 hex digits of the
status and normalised first message line: stable across runs and machines) and ``root_cause_count``
in JSON, and the top-level ``root_causes`` list says each one once; the other records get null.
JUnit keeps one testcase per record (a dashboard counts and tracks tests one by one) and names the
root cause in each failure's text. An outside backend (``pkg.module:attr``) is shown by its ``name``
in the text report's table, headings and progress lines; every repro keeps the import path.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import secrets
import shlex
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree as ET

from moeconf.harness.engine import CheckResult
from moeconf.harness.status import ENVIRONMENT, FAILING, SEVERITY, STATUSES

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EVIDENCE_LINES = 60
"""Most lines of one cause's multi-line evidence in the text report (JSON/JUnit keep all of it)."""
REPROS_PER_CAUSE = 8
"""Most repro lines under one cause in the text report (every record's repro is in JSON/JUnit)."""
FULL_EVIDENCE_NOTE = "full evidence for every rank: rerun with --output r.json"


def exit_status(records: Sequence[CheckResult]) -> int:
    """The exit rule of ``moeconf.harness.status``: 1 when any record blames the code under test
    (fail/error); else 2 when the environment kept a record from being judged (setup) or nothing was
    checked at all (no record, or every record skipped); else 0."""
    if any(r.status in FAILING for r in records):
        return EXIT_FAILED
    if any(r.status in ENVIRONMENT for r in records) or all(r.status == "skip" for r in records):
        return EXIT_USAGE
    return EXIT_OK


def summary(records: Sequence[CheckResult], wall_s: float | None = None) -> dict[str, object]:
    counts = Counter(r.status for r in records)
    out: dict[str, object] = {s: counts.get(s, 0) for s in STATUSES}
    out["total"] = len(records)
    out["ok"] = exit_status(records) == EXIT_OK
    if wall_s is not None:
        out["wall_s"] = round(wall_s, 2)
    return out


def to_json(records: Sequence[CheckResult], wall_s: float | None = None) -> str:
    """``results`` (every record, plus its ``root_cause`` and ``root_cause_count``), ``summary`` and
    ``root_causes``: each fail/error/setup cause once (id, status, headline, count, cases, checks)."""
    causes = _causes(r for r in records if r.status in FAILING or r.status in ENVIRONMENT)
    of = {id(r): c for c in causes for r in c.records}
    results = []
    for r in records:
        cause = of.get(id(r))
        results.append(
            {**r.to_dict(), "root_cause": cause and cause.id, "root_cause_count": cause and len(cause.records)}
        )
    doc = {
        "results": results,
        "summary": summary(records, wall_s),
        "root_causes": [
            {
                "id": c.id,
                "status": c.status,
                "headline": c.headline,
                "count": len(c.records),
                "cases": len({_case_key(r) for r in c.records}),
                "checks": list(dict.fromkeys(r.check for r in c.records)),
            }
            for c in causes
        ],
    }
    return json.dumps(doc, indent=1)


def arch_label(r: CheckResult) -> str:
    """The record's architecture, with its config sample when not the registered tiny one
    (``qwen3_moe@published:qwen3-30b-a3b``)."""
    return r.arch if r.config == "tiny" else f"{r.arch}@{r.config}"


def _err(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def progress_line(group: Sequence[CheckResult]) -> str:
    """One line per (arch, backend, dtype, case) when the case has ended."""
    first = group[0]
    counts = Counter(r.status for r in group)
    verdict = " ".join(f"{counts[s]} {s}" for s in STATUSES if counts.get(s))
    failed = [r.check for r in group if r.status in FAILING]
    tail = f"  <- {', '.join(failed)}" if failed else ""
    backend = display_name(first.backend)
    return f"{arch_label(first):<14} {backend:<15} {first.dtype:<5} {first.device:<4} {first.case:<13} {verdict}{tail}"


def start_line(arch: str, backend: str, dtype: str, device: str) -> str:
    """The line printed before an (arch, backend, dtype) starts: a stuck run names what it is stuck in."""
    return f"{arch:<14} {display_name(backend):<15} {dtype:<5} {device:<4} ..."


# --- backend names -----------------------------------------------------------------------------


def display_name(backend: str) -> str:
    """The ``name`` of an outside backend given as ``pkg.module:attr``, for a person to read; the
    path itself when the backend is not an import path, its module is not imported in this process
    (a report is never the reason code runs: nothing is imported, called or instantiated), or it
    has no string ``name`` (a factory, a name set only in ``__init__``)."""
    module_name, sep, attrs = backend.partition(":")
    obj: object = sys.modules.get(module_name) if sep and module_name and attrs else None
    for attr in attrs.split(".") if obj is not None else ():
        obj = getattr(obj, attr, None)
    try:
        name = getattr(obj, "name", None) if obj is not None else None
    except Exception:  # noqa: BLE001 - a property of the backend's own that raised
        name = None
    return name.strip() if isinstance(name, str) and name.strip() and "\n" not in name else backend


def _display_names(records: Sequence[CheckResult]) -> dict[str, str]:
    """Backend → what the text report calls it: its name, unless that would be ambiguous (another
    backend of the report is called the same, or has that name as its own)."""
    backends = list(dict.fromkeys(r.backend for r in records))
    named = {b: display_name(b) for b in backends}
    counts = Counter(named.values())
    return {b: n if n == b or (counts[n] == 1 and n not in backends) else b for b, n in named.items()}


def _shown(r: CheckResult, names: dict[str, str]) -> str:
    return names.get(r.backend, r.backend)


# --- text report -------------------------------------------------------------------------------


def _table(records: Sequence[CheckResult], names: dict[str, str]) -> list[str]:
    """Rows (arch, backend, dtype, device) × columns check: the worst status over the cases; a line
    per renamed backend says which import path its name stands for."""
    table: dict[tuple[str, str, str, str], dict[str, CheckResult]] = {}
    for r in records:
        row = table.setdefault((arch_label(r), _shown(r, names), r.dtype, r.device), {})
        if r.check not in row or SEVERITY[r.status] < SEVERITY[row[r.check].status]:
            row[r.check] = r
    checks = list(dict.fromkeys(r.check for r in records))
    header = ["arch", "backend", "dtype", "dev"] + [
        c.replace("grad_", "g_").replace("routing_weights", "weights").replace("shared_experts", "shared")
        for c in checks
    ]
    rows = [[*key, *(row[c].status if c in row else "" for c in checks)] for key, row in table.items()]
    widths = [max(len(cells[i]) for cells in [header, *rows]) for i in range(len(header))]
    lines = [" ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip() for cells in [header, *rows]]
    return lines + [f"({name} = --backend {path})" for path, name in names.items() if name != path]


@dataclass
class _Cause:
    """Records whose status and first message line agree: one root cause in the text report."""

    status: str
    headline: str
    records: list[CheckResult] = field(default_factory=list)

    @property
    def id(self) -> str:
        """``rc-`` + 8 hex digits of (status, headline): the same cause has the same id in every run."""
        return "rc-" + hashlib.sha1(f"{self.status}\0{self.headline}".encode()).hexdigest()[:8]

    @property
    def evidence(self) -> str:
        """The first multi-line message of the cause (a rank report, a stuck call's stack)."""
        return next((r.message for r in self.records if "\n" in r.message), "")


_WHERE_EVIDENCE = re.compile(r"(; it was at:| \((stack|every rank's evidence) on the [^()]*\))$")
"""What the engine appends to one record's first line (it carries the long evidence) or to the others'
(they point at it): not part of the cause."""


def _headline(r: CheckResult) -> str:
    headline = r.message.strip().splitlines()[0] if r.message.strip() else "(no message)"
    return _WHERE_EVIDENCE.sub("", headline)


def _causes(records: Iterable[CheckResult]) -> list[_Cause]:
    causes: dict[tuple[str, str], _Cause] = {}
    for r in records:
        headline = _headline(r)
        causes.setdefault((r.status, headline), _Cause(r.status, headline)).records.append(r)
    return list(causes.values())


CaseKey = tuple[str, str, str, str, str]
"""(arch, backend, dtype, device, case): what one repro command reruns."""


def _case_key(r: CheckResult) -> CaseKey:
    return (arch_label(r), r.backend, r.dtype, r.device, r.case)


def _repro_for_checks(repro: str, checks: Sequence[str] | None) -> str:
    """``repro`` (which reruns one record) rewritten to rerun ``checks`` of the same case, or the
    whole case when ``checks`` is None."""
    argv = shlex.split(repro)
    if "--check" not in argv or (checks is not None and len(checks) == 1):
        return repro
    at = argv.index("--check")
    return shlex.join([*argv[:at], *(["--check", *checks] if checks else []), *argv[at + 2 :]])


def _repro_lines(cause: _Cause, case_checks: dict[CaseKey, set[str]]) -> list[str]:
    """One repro per distinct (arch, backend, dtype, device, case) of the cause, at most a few;
    without ``--check`` where the cause is every record of that case in the report."""
    by_case: dict[CaseKey, list[str]] = {}
    first: dict[CaseKey, CheckResult] = {}
    for r in cause.records:
        by_case.setdefault(_case_key(r), []).append(r.check)
        first.setdefault(_case_key(r), r)
    lines = []
    for key, checks in list(by_case.items())[:REPROS_PER_CAUSE]:
        whole_case = len(checks) > 1 and set(checks) == case_checks.get(key)
        lines.append(f"  repro: {_repro_for_checks(first[key].repro, None if whole_case else checks)}")
    if len(by_case) > REPROS_PER_CAUSE:
        lines.append(f"  ... and {len(by_case) - REPROS_PER_CAUSE} more cases (every record's repro: --output r.json)")
    return lines


def _rank_sections(lines: list[str]) -> tuple[list[str], list[list[str]]]:
    """A launcher report's preamble and its ``--- rank N: ...`` sections."""
    starts = [i for i, line in enumerate(lines) if line.startswith("--- rank ")]
    if not starts:
        return lines, []
    bounds = [*starts, len(lines)]
    return lines[: starts[0]], [lines[a:b] for a, b in itertools.pairwise(bounds)]


def _first_failing(sections: list[list[str]], preamble: list[str], headline: str) -> list[str]:
    """The section of the rank that failed first (named by the launcher), else the first one that
    did not exit cleanly, else the first."""
    named = [line.split("rank ", 1)[1].split()[0] for line in [*preamble, headline] if "failed first" in line]
    for section in sections:
        if named and section[0].startswith(f"--- rank {named[0]}:"):
            return section
    return next((s for s in sections if not s[0].endswith("exit code 0")), sections[0])


def evidence_excerpt(message: str, max_lines: int = EVIDENCE_LINES) -> list[str]:
    """The lines after a multi-line message's first line, cut for a person to read: a multi-rank
    report keeps its preamble and the first failing rank's section; at most ``max_lines`` lines,
    then a note saying what was left out."""
    lines = message.rstrip().splitlines()[1:]
    if not lines:
        return []
    preamble, sections = _rank_sections(lines)
    shown = [*preamble, *_first_failing(sections, preamble, message.splitlines()[0])] if sections else lines
    cut = shown[:max_lines]
    left_out = len(lines) - len(cut)
    if left_out:
        others = f", {len(sections) - 1} other rank(s)" if len(sections) > 1 else ""
        note = FULL_EVIDENCE_NOTE if sections else "full message: rerun with --output r.json"
        cut.append(f"({left_out} more lines{others}; {note})")
    return cut


SCOPE_GROUPS = 6
"""Most (arch, ...) groups of cases named in one cause's heading (the rest are counted)."""


def _scope(records: Sequence[CheckResult], names: dict[str, str]) -> str:
    """Where a cause struck, for its heading: ``4 cases: mixtral random, single_token; qwen2_moe
    random; my-kernel fp32 cpu; 9 checks`` (what every case shares is said once, at the end)."""
    keys = list(dict.fromkeys((arch_label(r), _shown(r, names), r.dtype, r.device, r.case) for r in records))
    shared = [i for i in (1, 2, 3) if len({k[i] for k in keys}) == 1]
    groups: dict[str, list[str]] = {}
    for key in keys:
        label = " ".join(key[i] for i in (0, 1, 2, 3) if i not in shared)
        groups.setdefault(label, []).append(key[4])
    named = [f"{label} {', '.join(cases)}" for label, cases in list(groups.items())[:SCOPE_GROUPS]]
    if len(groups) > SCOPE_GROUPS:
        named.append(f"+{len(groups) - SCOPE_GROUPS} more")
    checks = len({r.check for r in records})
    parts = ["; ".join(named), " ".join(keys[0][i] for i in shared), f"{checks} check{'s' if checks != 1 else ''}"]
    return f"{len(keys)} case{'s' if len(keys) != 1 else ''}: " + "; ".join(p for p in parts if p)


def _cause_lines(cause: _Cause, case_checks: dict[CaseKey, set[str]], names: dict[str, str]) -> list[str]:
    first = cause.records[0]
    if len(cause.records) == 1:
        head = (
            f"- {cause.status.upper()} {arch_label(first)} {_shown(first, names)} {first.dtype} {first.device} "
            f"case={first.case} check={first.check}: {cause.headline}"
        )
        if first.max_abs_err is not None:
            head += f" (max_abs_err={_err(first.max_abs_err)}, atol={first.atol}, rtol={first.rtol})"
    else:
        head = (
            f"- {cause.status.upper()} ×{len(cause.records)} ({_scope(cause.records, names)}) "
            f"[{cause.id}]: {cause.headline}"
        )
    evidence = ["    " + line for line in evidence_excerpt(cause.evidence)]
    return [head, *evidence, *_repro_lines(cause, case_checks)]


def _skip_lines(skipped: Sequence[CheckResult], names: dict[str, str]) -> list[str]:
    """One line per distinct skip reason, with its count and the backends it concerns."""
    lines = []
    for cause in _causes(skipped):
        backends = list(dict.fromkeys(_shown(r, names) for r in cause.records))
        scope = ", ".join(backends[:3]) + (f" +{len(backends) - 3}" if len(backends) > 3 else "")
        lines.append(f"- {len(cause.records)} records ({scope}): {cause.headline}")
    return lines


def to_text(records: Sequence[CheckResult], wall_s: float | None = None) -> str:
    """The table, then failing causes with repros, environment faults, skips, warnings, xfails."""
    names = _display_names(records)
    lines = _table(records, names)
    case_checks: dict[CaseKey, set[str]] = {}
    for r in records:
        case_checks.setdefault(_case_key(r), set()).add(r.check)
    bad = [r for r in records if r.status in FAILING]
    if bad:
        causes = _causes(bad)
        lines += ["", f"{len(bad)} failing record(s), {len(causes)} distinct cause(s):"]
        for cause in causes:
            lines += _cause_lines(cause, case_checks, names)
    environment = [r for r in records if r.status in ENVIRONMENT]
    if environment:
        lines += ["", f"{len(environment)} record(s) not judged: the environment failed, not the code under test:"]
        for cause in _causes(environment):
            lines += _cause_lines(cause, case_checks, names)
    skipped = [r for r in records if r.status == "skip"]
    if skipped:
        lines += ["", f"{len(skipped)} skipped record(s):", *_skip_lines(skipped, names)]
    warnings = [r for r in records if r.status == "pass" and r.message.startswith("WARNING:")]
    if warnings:
        lines += ["", "warnings:"] + [f"- {r.arch} {r.check}: {r.message[len('WARNING:') :].strip()}" for r in warnings]
    xfails = [r for r in records if r.status == "xfail"]
    if xfails:
        lines += ["", "expected failures (declared in the registry):"]
        lines += sorted(
            {f"- {arch_label(r)} {_shown(r, names)} {r.dtype} {r.check}: {r.message.split('. ')[0]}" for r in xfails}
        )
    s = summary(records, wall_s)
    lines += ["", " ".join(f"{s[k]} {k}" for k in STATUSES) + (f" in {s['wall_s']} s" if wall_s is not None else "")]
    return "\n".join(lines) + "\n"


def environment_summary(records: Sequence[CheckResult]) -> str | None:
    """One line for stderr when the environment kept records from being judged, else None."""
    causes = _causes(r for r in records if r.status in ENVIRONMENT)
    if not causes:
        return None
    count = sum(len(c.records) for c in causes)
    more = f"; {len(causes) - 1} other cause(s) in the report" if len(causes) > 1 else ""
    headline = causes[0].headline.removeprefix("environment:").strip()
    return f"environment: {headline} ({count} record(s) not judged: fix the machine, not the code under test{more})"


# --- JUnit -------------------------------------------------------------------------------------


def to_junit(records: Sequence[CheckResult], wall_s: float | None = None) -> str:
    """JUnit XML: one testcase per record, classname ``arch.backend.dtype.device``, name ``case::check``.

    A ``setup`` record is an ``<error type="environment">``: it must not show green, and the type
    tells a CI dashboard that the machine, not the code, is at fault. Not grouped by root cause (a
    dashboard counts and tracks testcases one by one): a record that shares its cause with others
    says so, with the cause's id, in its failure text."""
    s = summary(records, wall_s)
    suite = ET.Element(
        "testsuite",
        name="moeconf",
        tests=str(len(records)),
        failures=str(s["fail"]),
        errors=str(int(s["error"]) + int(s["setup"])),  # type: ignore[call-overload]
        skipped=str(s["skip"]),
        time=str(s.get("wall_s", 0)),
    )
    causes = _causes(r for r in records if r.status in FAILING or r.status in ENVIRONMENT)
    of = {id(r): c for c in causes for r in c.records}
    for r in records:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"{arch_label(r)}.{r.backend}.{r.dtype}.{r.device}",
            name=f"{r.case}::{r.check}",
        )
        detail = f"{r.message}\nmax_abs_err={_err(r.max_abs_err)} atol={r.atol} rtol={r.rtol}\nrepro: {r.repro}"
        cause = of.get(id(r))
        if cause is not None and len(cause.records) > 1:
            detail += f"\nroot cause {cause.id}: shared by {len(cause.records)} records of this report"
        headline = r.message.strip().splitlines()[0] if r.message.strip() else ""
        if r.status == "fail":
            ET.SubElement(case, "failure", message=headline or "check failed").text = detail
        elif r.status == "error":
            ET.SubElement(case, "error", message=headline or "backend error").text = detail
        elif r.status == "setup":
            ET.SubElement(case, "error", type="environment", message=headline or "environment").text = detail
        elif r.status == "skip":
            ET.SubElement(case, "skipped", message=r.message)
        elif r.status == "xfail":
            ET.SubElement(case, "system-out").text = f"xfail: {r.message}"
    return ET.tostring(ET.ElementTree(suite).getroot(), encoding="unicode", xml_declaration=True) + "\n"


RENDERERS = {"text": to_text, "json": to_json, "junit": to_junit}


# --- report files ------------------------------------------------------------------------------


class ReportPathError(ValueError):
    """``--output`` names a place where no report can be written (a usage error, found up front)."""


def check_report_path(path: Path) -> Path:
    """The file a report for ``path`` will replace, checked *before* any work: its directory exists,
    is a directory and lets us create a file in it (tried, not guessed from permission bits, which
    say nothing for root or read-only file systems); ``path`` is not a directory or device.
    A symlink is followed, so the report lands where the link points. Leaves nothing behind."""
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    parent = target.parent
    if not parent.exists():
        raise ReportPathError(f"cannot write the report to {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise ReportPathError(f"cannot write the report to {path}: {parent} is not a directory")
    if target.exists() and not target.is_file():
        raise ReportPathError(f"cannot write the report to {path}: it exists and is not a regular file")
    try:
        fd, probe = _create_beside(target)
    except OSError as exc:
        raise ReportPathError(f"cannot write the report to {path}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)
    return target


def _create_beside(path: Path) -> tuple[int, Path]:
    """A new, empty, hidden file in ``path``'s directory, opened for writing.

    NOTE: not ``tempfile.mkstemp``: it creates files 0600, and the report would keep that mode after
    the rename. ``os.open(..., 0o666)`` lets the kernel apply the user's umask, as for any file they
    create; ``O_EXCL`` with a random name gives mkstemp's safety."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write to a temp file beside ``path`` and rename it over ``path``: a reader sees the old
    report or the whole new one, never half. The file gets the mode of any new file of the user's
    (0666 minus the umask). The directory must exist (``check_report_path`` says so up front)."""
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
