"""Run moeconf on LLaMA-Factory 0.9.5 and write the findings report (``nox -s client_llamafactory``).

    python -m clients.llamafactory.run --out client-results/llamafactory/<transformers> [--root DIR | --wheel-dir DIR]

1. ``add_z3_leaf_module`` → ``moeconf.integration.audit_leaf_function`` over the registered model types it has a
   branch for; 2. ``configure_moe`` → ``audit_configure_function`` likewise; 3. the NPU fused MoE forward
   (``npu_backend.BACKEND``) → moeconf's engine (``run_selection``, as ``moeconf check --backend`` runs it) over
   every registered architecture ``kernel_moe_mapping`` patches, fp32 and bf16.

Exit status: 0 when the report was written, whatever it found (findings are about LLaMA-Factory, and are
counted on stdout and in the summary); 2 when something could not be judged (a ``setup`` record, e.g. no
DeepSpeed, or nothing selected): that must not pass green; 1 when the runner itself failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

from clients.llamafactory import loader, source

BACKEND_REF = "clients.llamafactory.npu_backend:BACKEND"
FAILING = ("fail", "error")


def _text_type(arch: str) -> str | None:
    from moeconf.integration import default_config

    text = getattr(default_config(arch), "text_config", None)
    return getattr(text, "model_type", None)


def targets(fn: object) -> list[str]:
    """Registered model types ``fn`` has a branch for (its own type, or its text model's)."""
    from moeconf.registry import all_entries

    own, text = source.handled(fn)
    return [a for a in all_entries() if a in own or (text and _text_type(a) in text)]


def _finding(record: dict[str, Any], part: str, where: list[str]) -> dict[str, Any]:
    return {
        "part": part,
        "arch": record["arch"],
        "check": record["check"],
        "status": record["status"],
        "dtype": record["dtype"],
        "case": record["case"],
        "message": record["message"],
        "llamafactory": where,
    }


def audit(root: Path) -> dict[str, Any]:
    from moeconf.harness.engine import Selection, run_selection
    from moeconf.integration import audit_configure_function, audit_leaf_function
    from moeconf.registry import all_entries

    moe = loader.load_moe(root)
    kernel = loader.load_npu_fused_moe(root)
    leaf_archs, conf_archs = targets(moe.add_z3_leaf_module), targets(moe.configure_moe)
    npu_archs = [a for a, e in all_entries().items() if e.model_class in kernel.kernel_moe_mapping]

    records: list[dict[str, Any]] = []
    findings: list[dict[str, Any]] = []
    for part, fn, results in (
        ("leaf", moe.add_z3_leaf_module, audit_leaf_function(moe.add_z3_leaf_module, archs=leaf_archs)),
        ("configure", moe.configure_moe, audit_configure_function(moe.configure_moe, archs=conf_archs)),
    ):
        for result in results:
            record = {"part": part, **result.to_check_result().to_dict(), "integration_status": result.status}
            records.append(record)
            if result.status in FAILING:
                where = source.evidence(fn, root, result.arch, _text_type(result.arch))
                if result.check == "configure_aux_coef":
                    where += source.branches_setting(fn, root, "moe_aux_loss_coef")
                findings.append(_finding(record, part, where))

    sel = Selection(archs=tuple(npu_archs), backends=(BACKEND_REF,), dtypes=("fp32", "bf16"), program="moeconf")
    for group in run_selection(sel):
        for result in group:
            record = {"part": "npu_fused_moe", **result.to_dict()}
            records.append(record)
            if result.status in FAILING:
                model_class = all_entries()[result.arch].model_class
                where = [
                    f"{source.definition(fn, root)}: {fn.__qualname__}, bound to {cls} for {model_class}"
                    for cls, fn in kernel.kernel_moe_mapping[model_class].items()
                ]
                findings.append(_finding(record, "npu_fused_moe", where))

    from moeconf.npu import current_rules

    return {
        "llamafactory": loader.VERSION,
        "transformers": version("transformers"),
        "deepspeed": _version("deepspeed"),
        "torch": version("torch"),
        "torch_npu_rules": current_rules().version,
        "root": str(root.resolve()),
        "targets": {"leaf": leaf_archs, "configure": conf_archs, "npu_fused_moe": npu_archs},
        "findings": findings,
        "records": records,
    }


def _version(name: str) -> str | None:
    try:
        return version(name)
    except Exception:  # noqa: BLE001 - not installed
        return None


def summary(report: dict[str, Any]) -> str:
    """The markdown summary: versions, what ran, each finding with moeconf's message and LLaMA-Factory's lines."""
    counts: dict[str, dict[str, int]] = {}
    for r in report["records"]:
        part = counts.setdefault(r["part"], {})
        part[r["status"]] = part.get(r["status"], 0) + 1
    lines = [
        f"# LLaMA-Factory {report['llamafactory']} under moeconf",
        "",
        (
            f"transformers {report['transformers']}, DeepSpeed {report['deepspeed']}, torch {report['torch']}, "
            f"torch_npu rules {report['torch_npu_rules']} (emulator unless on an Ascend device)."
        ),
        "",
        "| part | architectures | records |",
        "|---|---|---|",
    ]
    for part, key in (("leaf", "leaf"), ("configure", "configure"), ("npu_fused_moe", "npu_fused_moe")):
        c = counts.get(part, {})
        lines.append(
            f"| {part} | {', '.join(report['targets'][key]) or '-'} | "
            + ", ".join(f"{n} {s}" for s, n in sorted(c.items()))
            + " |"
        )
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for f in report["findings"]:  # one entry per (part, arch, status, message, evidence); records listed
        message = f["message"]
        for prefix in (report["root"], os.path.relpath(report["root"])):  # wheel paths as llamafactory/...
            message = message.replace(prefix + "/", "")
        first, *rest = message.splitlines() or [""]
        groups.setdefault((f["part"], f["arch"], f["status"], first, tuple(rest), tuple(f["llamafactory"])), []).append(
            f
        )
    lines += [
        "",
        f"**{len(report['findings'])} finding(s)** (records with status fail or error), {len(groups)} distinct:",
        "",
    ]
    for i, ((part, arch, status, first, rest, where), found) in enumerate(groups.items(), 1):
        checks = ", ".join(dict.fromkeys(f["check"] for f in found))
        runs = ", ".join(dict.fromkeys(f"{f['dtype']}/{f['case']}" for f in found))
        lines += [f"{i}. **{arch}** `{part}` ({status}; checks: {checks}; {runs}): {first}"]
        lines += [f"   - moeconf: {m}" for m in rest]
        lines += [f"   - `{w}`" for w in where]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.llamafactory.run")
    parser.add_argument("--out", type=Path, required=True, help="report folder (report.json, summary.md)")
    parser.add_argument("--root", type=Path, help="an unpacked llamafactory wheel (default: download and unpack)")
    parser.add_argument("--wheel-dir", type=Path, default=Path(".cache/llamafactory"), help="download folder")
    args = parser.parse_args(argv)
    root = args.root or loader.unpack(loader.download(args.wheel_dir), args.wheel_dir / "unpacked")
    os.environ[loader.ROOT_ENV] = str(root.resolve())
    report = audit(root)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "summary.md").write_text(summary(report))
    unjudged = [r for r in report["records"] if r["status"] == "setup"]
    print(f"{len(report['findings'])} finding(s) in LLaMA-Factory {loader.VERSION}; report: {args.out}/summary.md")
    if unjudged or not report["records"]:
        print(f"not judged: {len(unjudged)} setup record(s)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
