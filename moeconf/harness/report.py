"""Reports of check records: a text table, JSON and JUnit XML; files are written whole or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from xml.etree import ElementTree as ET

from moeconf.harness.engine import CheckResult
from moeconf.harness.status import FAILING, SEVERITY, STATUSES


def summary(records: Sequence[CheckResult], wall_s: float | None = None) -> dict[str, object]:
    counts = Counter(r.status for r in records)
    out: dict[str, object] = {s: counts.get(s, 0) for s in STATUSES}
    out["total"] = len(records)
    out["ok"] = not any(r.status in FAILING for r in records)
    if wall_s is not None:
        out["wall_s"] = round(wall_s, 2)
    return out


def to_json(records: Sequence[CheckResult], wall_s: float | None = None) -> str:
    return json.dumps({"results": [r.to_dict() for r in records], "summary": summary(records, wall_s)}, indent=1)


def _err(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def progress_line(group: Sequence[CheckResult]) -> str:
    """One line per (arch, backend, dtype, case) while the run goes on."""
    first = group[0]
    counts = Counter(r.status for r in group)
    verdict = " ".join(f"{counts[s]} {s}" for s in STATUSES if counts.get(s))
    failed = [r.check for r in group if r.status in FAILING]
    tail = f"  <- {', '.join(failed)}" if failed else ""
    return f"{first.arch:<14} {first.backend:<15} {first.dtype:<5} {first.device:<4} {first.case:<13} {verdict}{tail}"


def to_text(records: Sequence[CheckResult], wall_s: float | None = None) -> str:
    """A table per (arch, backend, dtype, device) × check (worst status over cases), then failures with repros."""
    order = SEVERITY
    table: dict[tuple[str, str, str, str], dict[str, CheckResult]] = {}
    for r in records:
        row = table.setdefault((r.arch, r.backend, r.dtype, r.device), {})
        if r.check not in row or order[r.status] < order[row[r.check].status]:
            row[r.check] = r
    checks = list(dict.fromkeys(r.check for r in records))
    abbreviations = {
        c: c.replace("grad_", "g_").replace("routing_weights", "weights").replace("shared_experts", "shared")
        for c in checks
    }
    lines = [
        f"{'arch':<14} {'backend':<15} {'dtype':<5} {'dev':<4} " + " ".join(f"{abbreviations[c]:<9}" for c in checks)
    ]
    for (arch, backend, dtype, device), row in table.items():
        cells = " ".join(f"{(row[c].status if c in row else ''):<9}" for c in checks)
        lines.append(f"{arch:<14} {backend:<15} {dtype:<5} {device:<4} {cells}")
    bad = [r for r in records if r.status in FAILING]
    if bad:
        lines += ["", f"{len(bad)} failing record(s):"]
        for r in bad:
            lines.append(
                f"- {r.status.upper()} {r.arch} {r.backend} {r.dtype} {r.device} case={r.case} check={r.check}: "
                f"{r.message} (max_abs_err={_err(r.max_abs_err)}, atol={r.atol}, rtol={r.rtol})"
            )
            lines.append(f"  repro: {r.repro}")
    warnings = [r for r in records if r.status == "pass" and r.message.startswith("WARNING:")]
    if warnings:
        lines += ["", "warnings:"] + [f"- {r.arch} {r.check}: {r.message[len('WARNING:') :].strip()}" for r in warnings]
    xfails = [r for r in records if r.status == "xfail"]
    if xfails:
        lines += ["", "expected failures (declared in the registry):"]
        lines += sorted({f"- {r.arch} {r.backend} {r.dtype} {r.check}: {r.message.split('. ')[0]}" for r in xfails})
    s = summary(records, wall_s)
    lines += ["", " ".join(f"{s[k]} {k}" for k in STATUSES) + (f" in {s['wall_s']} s" if wall_s is not None else "")]
    return "\n".join(lines) + "\n"


def to_junit(records: Sequence[CheckResult], wall_s: float | None = None) -> str:
    """JUnit XML: one testcase per record, classname ``arch.backend.dtype.device``, name ``case::check``."""
    s = summary(records, wall_s)
    suite = ET.Element(
        "testsuite",
        name="moeconf",
        tests=str(len(records)),
        failures=str(s["fail"]),
        errors=str(s["error"]),
        skipped=str(s["skip"]),
        time=str(s.get("wall_s", 0)),
    )
    for r in records:
        case = ET.SubElement(
            suite, "testcase", classname=f"{r.arch}.{r.backend}.{r.dtype}.{r.device}", name=f"{r.case}::{r.check}"
        )
        detail = f"{r.message}\nmax_abs_err={_err(r.max_abs_err)} atol={r.atol} rtol={r.rtol}\nrepro: {r.repro}"
        if r.status == "fail":
            ET.SubElement(case, "failure", message=r.message or "check failed").text = detail
        elif r.status == "error":
            ET.SubElement(case, "error", message=r.message or "backend error").text = detail
        elif r.status == "skip":
            ET.SubElement(case, "skipped", message=r.message)
        elif r.status == "xfail":
            ET.SubElement(case, "system-out").text = f"xfail: {r.message}"
    return ET.tostring(ET.ElementTree(suite).getroot(), encoding="unicode", xml_declaration=True) + "\n"


RENDERERS = {"text": to_text, "json": to_json, "junit": to_junit}


def write_atomically(path: Path, text: str) -> None:
    """Write to a temp file beside ``path`` and rename: a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
