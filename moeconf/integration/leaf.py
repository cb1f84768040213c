"""``audit_leaf_function``: does a framework's ZeRO-3 leaf function mark the MoE block, on every rank?

A leaf function (``leaf_fn(model)``, typically calling ``deepspeed.utils.set_z3_leaf_modules(model,
[SomeBlock])``) decides which modules ZeRO-3 fetches as a whole. Three ways to get it wrong, each a
check per architecture:

* ``leaf_marks`` — it marks nothing (a wrong class name or model-type key): ZeRO-3 hooks each expert
  and ranks that route to different experts hang (docs/regression-cases.md #3).
* ``leaf_is_block`` — it marks something other than the MoE block: a sub-module (router, experts)
  leaves the per-expert fetches in place; an ancestor (decoder layer, whole model) gathers all its
  parameters at once, so nothing under it stays partitioned.
* ``leaf_ranks_agree`` — independently built models, under different ranks' environment and seeds,
  get the same marked paths (ranks that hook different modules issue all-gathers that never match).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from functools import partial

from torch import nn

from moeconf.integration.environment import as_rank, deepspeed_default_leaves_off, preserved_rng, zero3_enabled
from moeconf.integration.models import moe_blocks, tiny_model
from moeconf.integration.results import AuditResult, function_ref, repro_command
from moeconf.registry import REGISTRY, ArchEntry, get_entry
from moeconf.tools.audit import brief_error

LeafFunction = Callable[[nn.Module], object]
"""``leaf_fn(model)``: marks ZeRO-3 leaves on ``model`` in place; its return value is ignored."""

ResultFactory = Callable[..., AuditResult]
"""``AuditResult`` with the architecture, function and repro filled in."""

LEAF_CHECKS = ("leaf_marks", "leaf_is_block", "leaf_ranks_agree")
LEAF_FLAG = "_z3_leaf"
"""The attribute ``set_z3_leaf_modules`` sets and ZeRO-3 reads (``deepspeed.utils.z3_leaf_module``)."""


def marked_modules(model: nn.Module) -> dict[str, str]:
    """``{path: class name}`` of the modules flagged as ZeRO-3 leaves (the root's path is ``""``)."""
    return {path: type(m).__name__ for path, m in model.named_modules() if getattr(m, LEAF_FLAG, False)}


def _clear_marks(model: nn.Module) -> None:
    for module in model.modules():
        module.__dict__.pop(LEAF_FLAG, None)


def _names(modules: dict[str, str]) -> tuple[str, ...]:
    return tuple(f"{cls}@{path or '<root>'}" for path, cls in modules.items())


def _relation(path: str, blocks: Iterable[str]) -> str:
    """How a wrongly marked module sits relative to the MoE blocks, and what ZeRO-3 then does."""
    blocks = list(blocks)
    if any(path.startswith(b + ".") for b in blocks):
        return (
            "inside the MoE block (a sub-module such as the router or the experts): ZeRO-3 still hooks the "
            "block's children and fetches experts in routing order, which differs across ranks"
        )
    if any(path == "" or b.startswith(path + ".") for b in blocks):
        return (
            "an ancestor of the MoE block (the decoder layer or the whole model): ZeRO-3 gathers all of its "
            "parameters at once, so nothing under it stays partitioned during compute"
        )
    return "not the MoE block nor related to it"


def _run_on_ranks(
    leaf_fn: LeafFunction, entry: ArchEntry, ranks: int, zero3: bool
) -> tuple[list[dict[str, str]], dict[str, str]]:
    """Marked modules of ``ranks`` independently built models, and the MoE blocks of the first."""
    runs = []
    blocks: dict[str, str] = {}
    for rank in range(ranks):
        model = tiny_model(entry, device="meta")  # flags need no weights
        _clear_marks(model)
        with ExitStack() as stack:
            stack.enter_context(deepspeed_default_leaves_off())
            stack.enter_context(as_rank(rank, ranks))
            if zero3:
                stack.enter_context(zero3_enabled())
            try:
                leaf_fn(model)
            except Exception as exc:
                raise _LeafRaised(rank, exc) from exc
        runs.append(marked_modules(model))
        blocks = blocks or moe_blocks(model, entry)
    return runs, blocks


class _LeafRaised(Exception):
    def __init__(self, rank: int, exc: BaseException) -> None:
        super().__init__(f"raised on rank {rank}: {brief_error(exc)}")


def _audit_entry(leaf_fn: LeafFunction, entry: ArchEntry, required: bool, ranks: int, zero3: bool) -> list[AuditResult]:
    extra = ([] if ranks == 2 else ["--ranks", str(ranks)]) + ([] if zero3 else ["--no-zero3"])
    ref = function_ref(leaf_fn)
    repro = repro_command("leaf", leaf_fn, entry.model_type, extra)
    result = partial(AuditResult, entry.model_type, function=ref, repro=repro)

    try:
        runs, blocks = _run_on_ranks(leaf_fn, entry, ranks, zero3)
    except _LeafRaised as exc:
        # The blocks it should have marked, so the record names the class the function missed.
        expected = _names(moe_blocks(tiny_model(entry, device="meta"), entry))
        return [result("leaf_marks", "fail", f"{ref} {exc}", expected=expected)] + [
            result(c, "skip", "not judged: the leaf function raised (see leaf_marks)") for c in LEAF_CHECKS[1:]
        ]
    expected = _names(blocks)
    if not any(runs) and not required:
        # NOTE: the same words for every architecture, so the text report lists them as one cause.
        why = "marks nothing: the function does not handle this model type (name it in archs to require it)"
        return [result(c, "skip", why) for c in LEAF_CHECKS]
    first = runs[0]
    out = []
    if first:
        out.append(
            result(
                "leaf_marks", "pass", f"marks {len(first)} module(s) on rank 0", expected=expected, actual=_names(first)
            )
        )
    else:
        out.append(
            result(
                "leaf_marks",
                "fail",
                f"{ref} marks no module of a tiny {entry.model_class} on rank 0 (a wrong class name or model-type "
                "key? DeepSpeed's default leaf list is off here: the function must mark the block itself): ZeRO-3 "
                "would hook each expert, and ranks routing to different experts hang",
                expected=expected,
            )
        )
    out.append(_is_block(result, first, blocks, expected))
    out.append(_ranks_agree(result, runs, expected))
    return out


def _is_block(
    result: ResultFactory, marked: dict[str, str], blocks: dict[str, str], expected: tuple[str, ...]
) -> AuditResult:
    if not marked:
        return result("leaf_is_block", "skip", "not judged: nothing marked (see leaf_marks)", expected=expected)
    wrong = [
        f"{cls}@{path or '<root>'} is {_relation(path, blocks)}" for path, cls in marked.items() if path not in blocks
    ]
    missing = [f"{cls}@{path}" for path, cls in blocks.items() if path not in marked]
    if not wrong and not missing:
        return result(
            "leaf_is_block",
            "pass",
            f"marks exactly the MoE block(s): {', '.join(expected)}",
            expected=expected,
            actual=_names(marked),
        )
    parts = wrong + ([f"MoE block(s) left unmarked: {', '.join(missing)}"] if missing else [])
    return result("leaf_is_block", "fail", "; ".join(parts), expected=expected, actual=_names(marked))


def _ranks_agree(result: ResultFactory, runs: Sequence[dict[str, str]], expected: tuple[str, ...]) -> AuditResult:
    first = runs[0]
    for rank, marked in enumerate(runs[1:], start=1):
        if marked != first:
            return result(
                "leaf_ranks_agree",
                "fail",
                f"rank 0 marks {', '.join(_names(first)) or 'nothing'}; rank {rank} marks "
                f"{', '.join(_names(marked)) or 'nothing'}: ranks that hook different modules issue all-gathers "
                "that never match (a hang)",
                expected=expected,
                actual=_names(marked),
            )
    return result(
        "leaf_ranks_agree",
        "pass",
        f"{len(runs)} independently built models, each under its rank's RANK/LOCAL_RANK and seed, mark the same paths",
        expected=expected,
        actual=_names(first),
    )


def _entries(archs: Iterable[str] | None) -> tuple[list[ArchEntry], bool]:
    if archs is None:
        return list(REGISTRY.values()), False
    return [get_entry(a) for a in archs], True


def audit_leaf_function(
    leaf_fn: LeafFunction, *, archs: Iterable[str] | None = None, ranks: int = 2, zero3: bool = True
) -> list[AuditResult]:
    """Audit a framework's ZeRO-3 leaf function on tiny models of registered architectures.

    Args:
        leaf_fn: ``leaf_fn(model)``, marking leaves in place (e.g. LLaMA-Factory's ``add_z3_leaf_module``).
        archs: model types the function must handle: marking nothing there fails. None: every registered
            type, and one where it marks nothing is skipped ("does not handle").
        ranks: independently built models, one per simulated rank (``RANK``/``LOCAL_RANK``, seed), ≥ 2.
        zero3: make ``transformers.integrations.is_deepspeed_zero3_enabled()`` True during the call.

    Returns:
        Per architecture, ``leaf_marks``, ``leaf_is_block`` and ``leaf_ranks_agree`` results (``setup``
        results when DeepSpeed is not importable: a leaf function cannot be judged without it).

    DeepSpeed's default leaf list is emptied during each call (see ``deepspeed_default_leaves_off``).
    """
    if ranks < 2:
        raise ValueError(f"ranks={ranks}: agreement needs at least 2")
    entries, required = _entries(archs)
    try:
        import deepspeed.utils  # noqa: F401 (the function under test marks through it)
    except Exception as exc:  # noqa: BLE001 (ImportError, or deepspeed failing to initialise its accelerator)
        return [
            AuditResult(
                e.model_type, c, "setup", f"deepspeed not importable: {brief_error(exc)}", function_ref(leaf_fn)
            )
            for e in entries
            for c in LEAF_CHECKS
        ]
    with preserved_rng():
        return [r for e in entries for r in _audit_entry(leaf_fn, e, required, ranks, zero3)]


__all__ = ["LEAF_CHECKS", "LeafFunction", "audit_leaf_function", "marked_modules"]
