"""``audit_lora_experts``: LoRA adapters on a MoE block's expert projections, audited against the reference.

Frameworks fine-tune MoE models with adapters on the experts. In transformers 5 the experts are fused
3-D parameters (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``), which PEFT adapts
through ``LoraConfig(target_parameters=[...])``: a ``lora.ParamWrapper`` that re-parametrises the tensor
as ``W + ΔW`` while the block runs. The audit wraps the entry's tiny block that way, with lora_B
*non-zero* (PEFT's default zero lora_B makes every lora_A gradient zero at step 0, which would hide a
dead adapter — and make a merge a no-op), runs forward and backward on a batch whose routing leaves the
last expert without a token, and checks:

* ``lora_targets`` — every 3-D expert parameter the entry binds is wrapped, with PEFT's per-expert
  layout (``lora_A [E·r, in]``, ``lora_B [out, r·E]``; see ``expert_factors``).
* ``lora_forward`` — the adapted block's output equals the float64 reference on ``W + ΔW``, with ΔW
  computed by moeconf from the adapter factors (not by PEFT).
* ``lora_grad_routed`` — each routed expert's adapter slice (its ``A_e`` and ``B_e``) of every wrapped
  parameter gets a non-zero gradient (a detached adapter trains nothing, silently).
* ``lora_grad_idle`` — each expert without a token gets *exact zeros* (not None) in its slices.
* ``lora_grad_reference`` — the adapter gradients equal the chain rule through ΔW of the reference's
  weight gradients at ``W + ΔW`` (fp32 grad tolerance).
* ``lora_merge`` — the merge function (PEFT's ``merge_and_unload`` by default) writes ``W_e + ΔW_e``
  for every expert (an idle one included: its delta is never visible in this batch's output) and the
  merged block reproduces the reference output.

Per-expert 2-D modules (transformers 4.x) and flat 2-D expert stacks (DBRX) are ``skip``: PEFT's
``target_parameters`` adapts them as one shared matrix, not per expert. See docs/integration.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from moeconf.harness.cases import CASE_SEED_STRIDE, CaseError, draw_params, select_tokens, token_pool
from moeconf.harness.checks import TOLERANCES, Outcome, compare, merge
from moeconf.hf.block import build_block, load_params, to_canonical
from moeconf.integration.results import AuditResult, function_ref
from moeconf.params import Params, round_through
from moeconf.reference import reference_forward, reference_gradients
from moeconf.registry import ArchEntry, get_entry
from moeconf.registry.layouts import LAYOUTS
from moeconf.tools.audit import brief_error

LORA_CHECKS = (
    "lora_targets",
    "lora_forward",
    "lora_grad_routed",
    "lora_grad_idle",
    "lora_grad_reference",
    "lora_merge",
)

LoraTarget = Literal["experts", "experts+router"]

ApplyLora = Callable[[nn.Module, Sequence[str], int], nn.Module]
"""``apply_lora(block, parameter_paths, rank)``: the block with rank-``rank`` LoRA adapters on the named
parameters (paths relative to the block); PEFT's ``LoraModel`` by default (``peft_apply_lora``)."""

MergeFn = Callable[[nn.Module], nn.Module]
"""``merge(adapted)``: a plain block whose parameters hold ``W + ΔW``; PEFT's ``merge_and_unload`` by default."""

TOKENS = (2, 6)
"""Batch and sequence length of the audited batch (12 tokens, top-k of E = 8 experts)."""

IDLE_EXPERT = -1
"""The expert kept without a token: the last one."""


# --- PEFT's layout ------------------------------------------------------------------------------------


def peft_apply_lora(block: nn.Module, paths: Sequence[str], rank: int) -> nn.Module:
    """PEFT's LoRA on ``paths`` (``LoraConfig(target_parameters=paths)``), lora_alpha = rank (scaling 1).

    ``init_lora_weights=False``: lora_B starts non-zero. With PEFT's default (lora_B = 0) every lora_A
    gradient is exactly zero at initialisation — indistinguishable from an adapter cut off from the
    graph — and ΔW = 0 makes any merge look right. ``audit_lora_experts`` reseeds both factors.
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=[], target_parameters=list(paths), init_lora_weights=False
    )
    return LoraModel(block, config, "default")


def peft_merge(adapted: nn.Module) -> nn.Module:
    """PEFT's ``merge_and_unload``: the base block with every adapter folded into its parameter."""
    return adapted.merge_and_unload()


@dataclass
class Adapter:
    """One adapted parameter: PEFT's ``ParamWrapper`` factors, viewed per expert.

    Attributes:
        path: the parameter's path in the plain block (a binding path, e.g. ``experts.gate_up_proj``).
        lora_a: ``[E·r, in]`` (``nn.Linear(in, E·r).weight``).
        lora_b: ``[out, r·E]``.
        scaling: ``lora_alpha / r``.
        num_experts: E (1 for a 2-D parameter: one adapter).
        shape: the adapted parameter's shape.
    """

    path: str
    lora_a: nn.Parameter
    lora_b: nn.Parameter
    scaling: float
    num_experts: int
    shape: tuple[int, ...]
    transposed_hint: bool = False

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0] // self.num_experts

    def factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return expert_factors(a, b, self.num_experts)

    def delta(self, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW in the parameter's own shape, from the factors (default: the adapter's, as float64)."""
        a = self.lora_a.detach().double() if a is None else a
        b = self.lora_b.detach().double() if b is None else b
        a_e, b_e = self.factors(a, b)  # [E, r, in], [E, out, r]
        delta = self.scaling * (b_e @ a_e)  # [E, out, in]
        if len(self.shape) == 2:
            delta = delta[0]
        if tuple(delta.shape) == self.shape and not (self.transposed_hint and delta.shape[-1] == delta.shape[-2]):
            return delta
        if tuple(delta.transpose(-1, -2).shape) == self.shape:
            return delta.transpose(-1, -2)  # stored [E, in, out] (GPT-OSS's is_transposed experts)
        raise ValueError(f"{self.path}: adapter factors give ΔW {tuple(delta.shape)}, parameter is {self.shape}")


def expert_factors(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's per-expert factors of a 3-D ``target_parameters`` adapter: ``(A [E, r, in], B [E, out, r])``
    with ``ΔW_e = scaling · B_e @ A_e``.

    Expert ``e`` owns the *contiguous* rows ``e·r … e·r + r − 1`` of ``lora_A`` but the *strided*
    columns ``e, e + E, e + 2E, …`` of ``lora_B`` (PEFT reshapes lora_B to ``[out, r, E]``).
    """
    e = num_experts
    a_e = a.reshape(e, -1, a.shape[-1])
    b_e = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)
    return a_e, b_e


def expert_slices(adapter: Adapter, expert: int) -> dict[str, tuple[str, Any]]:
    """Where expert ``expert``'s adapter lives: ``{"lora_A": (rows), "lora_B": (columns)}`` as index objects."""
    r, e = adapter.rank, adapter.num_experts
    return {
        "lora_A": (f"rows {expert * r}:{expert * r + r}", (slice(expert * r, expert * r + r), slice(None))),
        "lora_B": (f"columns {expert}::{e}", (slice(None), slice(expert, None, e))),
    }


def find_adapters(adapted: nn.Module, paths: Sequence[str]) -> tuple[dict[str, Adapter], list[str]]:
    """The ``ParamWrapper`` adapters of ``adapted`` by plain-block parameter path, and the paths with none."""
    found: dict[str, Adapter] = {}
    for name, module in adapted.named_modules():
        pname = getattr(module, "parameter_name", None)
        lora_a = getattr(module, "lora_A", None)
        if pname is None or not isinstance(lora_a, nn.ModuleDict) or "default" not in lora_a:
            continue
        owner = ".".join(p for p in name.split(".") if p not in ("model", "base_layer") and p)
        path = f"{owner}.{pname}" if owner else pname
        param = module.get_param()
        found[path] = Adapter(
            path=path,
            lora_a=lora_a["default"].weight,
            lora_b=module.lora_B["default"].weight,
            scaling=float(module.scaling["default"]),
            num_experts=int(getattr(module, "num_experts", 1)),
            shape=tuple(param.shape),
            transposed_hint=not getattr(module, "_did_swap_in_out_features", True),
        )
    return found, [p for p in paths if p not in found]


# --- the audit ----------------------------------------------------------------------------------------


def entry_of(arch: str | ArchEntry) -> ArchEntry:
    return arch if isinstance(arch, ArchEntry) else get_entry(arch)


def lora_paths(entry: ArchEntry, target: LoraTarget = "experts") -> tuple[list[str], str | None]:
    """The binding paths an expert LoRA adapts (3-D expert weights; the router weight too for
    ``experts+router``), or a reason why this entry's experts cannot be adapted per expert."""
    block = build_block(entry, "eager" if "eager" in entry.experts_implementations else None)
    params = dict(block.named_parameters())
    prefix = entry.experts_path + "."
    experts = [
        b.path
        for b in entry.params
        if b.path.startswith(prefix) and b.path in params and any(c.startswith("experts.w_") for c in b.canonical)
    ]
    if any(b.expert is not None for b in entry.params):
        return (
            [],
            "per-expert modules (one 2-D weight per expert): PEFT adapts each expert separately, not a fused 3-D parameter",
        )
    if not experts:
        return [], f"no expert weight parameter under {entry.experts_path!r}"
    flat = [p for p in experts if params[p].dim() != 3]
    if flat:
        return [], (
            f"expert weights {', '.join(flat)} are not 3-D [E, out, in]: PEFT's target_parameters LoRA on them is one "
            "adapter shared by all experts, not per expert"
        )
    if target == "experts+router":
        experts += [b.path for b in entry.params if b.canonical == ("router.weight",) and b.path in params]
    return experts, None


@dataclass
class _Run:
    """One adapted block's forward/backward, and what the reference says about it."""

    adapters: dict[str, Adapter]
    output: torch.Tensor
    hidden: torch.Tensor
    mask: torch.Tensor
    grad_output: torch.Tensor
    merged_params: Params
    ref_output: torch.Tensor
    ref_grads: dict[str, torch.Tensor]
    routed: list[int]
    idle: list[int]
    adapted: nn.Module


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _seed_factors(adapters: dict[str, Adapter], seed: int) -> None:
    """Seeded, non-zero lora_A / lora_B of fan-in scale (ΔW comparable to W, every slice non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path in sorted(adapters):
            ad = adapters[path]
            for t in (ad.lora_a, ad.lora_b):
                fan_in = ad.lora_a.shape[-1] if t is ad.lora_a else ad.rank
                t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * (0.5 / math.sqrt(fan_in)))


def _merged_canonical(
    entry: ArchEntry, params: Params, adapters: dict[str, Adapter], block_params: dict[str, torch.Tensor]
) -> Params:
    """Canonical float64 parameters of ``W + ΔW`` (ΔW from the adapter factors, by moeconf)."""
    tensors = {path: block_params[path].detach().double() + ad.delta() for path, ad in adapters.items()}
    merged, _ = to_canonical(entry, tensors)
    return {**params, **{k: v for k, v in merged.items() if v is not None}}


def audit_lora_experts(
    arch: str | ArchEntry,
    *,
    target: LoraTarget = "experts",
    apply_lora: ApplyLora | None = None,
    merge_fn: MergeFn | None = None,
    rank: int = 2,
    seed: int = 0,
    experts_implementation: str = "eager",
) -> list[AuditResult]:
    """LoRA on the experts of ``arch``'s tiny block: gradients, idle-expert zeros, merge, vs the reference.

    Args:
        arch: a registered model type or an entry.
        target: ``"experts"`` (the 3-D expert weights) or ``"experts+router"`` (the router weight too).
        apply_lora: how adapters are attached (default ``peft_apply_lora``: PEFT's ``target_parameters``).
        merge_fn: how they are folded back (default ``peft_merge``: ``merge_and_unload``).
        rank: LoRA rank per expert.
        seed: parameters, adapter factors and tokens.
        experts_implementation: transformers' experts implementation the block runs with.

    Returns:
        One ``AuditResult`` per check of ``LORA_CHECKS`` (all ``skip`` with the reason where PEFT cannot
        target the entry's experts per expert; ``setup`` where peft is not installed).
    """
    entry = entry_of(arch)
    apply_lora = apply_lora or peft_apply_lora
    merge_fn = merge_fn or peft_merge
    function = function_ref(apply_lora)
    result = partial(AuditResult, entry.model_type, function=function)

    def all_(status: str, message: str) -> list[AuditResult]:
        return [result(check, status, message) for check in LORA_CHECKS]

    if apply_lora is peft_apply_lora or merge_fn is peft_merge:
        try:
            import peft  # noqa: F401
        except ImportError as exc:
            return all_("setup", f"peft is not importable ({brief_error(exc)}): pip install 'peft>=0.17'")
    paths, why = lora_paths(entry, target)
    if why is not None:
        return all_("skip", why)
    if experts_implementation not in entry.experts_implementations:
        return all_("skip", f"experts class does not accept experts_implementation={experts_implementation!r}")

    try:
        run = _run(entry, paths, apply_lora, rank, seed, experts_implementation)
    except CaseError as exc:
        return all_("skip", f"no batch leaves an expert idle: {exc}")
    except Exception as exc:  # noqa: BLE001 - the adapter function or PEFT failed on this block
        return all_("fail", f"adapting / running the block raised {brief_error(exc)}")
    if isinstance(run, str):
        return [result("lora_targets", "fail", run)] + [
            result(c, "skip", "adapters missing (lora_targets)") for c in LORA_CHECKS[1:]
        ]
    return [
        result(
            "lora_targets", "pass", f"adapted {', '.join(paths)}: per-expert rank {rank}, E={entry.spec.num_experts}"
        ),
        _verdict(result, "lora_forward", _check_forward(run)),
        _verdict(result, "lora_grad_routed", _check_routed(run)),
        _verdict(result, "lora_grad_idle", _check_idle(run)),
        _verdict(result, "lora_grad_reference", _check_grad_reference(entry, run)),
        _verdict(result, "lora_merge", _check_merge(entry, run, merge_fn, paths)),
    ]


def _verdict(result: Callable[..., AuditResult], check: str, outcome: Outcome) -> AuditResult:
    status = "skip" if outcome.passed is None else "pass" if outcome.passed else "fail"
    return result(check, status, outcome.message or "ok", max_abs_err=outcome.max_abs_err)


def _run(entry: ArchEntry, paths: list[str], apply_lora: ApplyLora, rank: int, seed: int, impl: str) -> _Run | str:
    spec = entry.spec
    params = round_through(draw_params(spec, seed), torch.float32)
    block = build_block(entry, impl)
    load_params(entry, block, params)
    base = {n: p.detach().clone() for n, p in block.named_parameters()}
    torch.manual_seed(seed)
    adapted = apply_lora(block, paths, rank)
    adapters, missing = find_adapters(adapted, paths)
    if missing:
        return f"no LoRA adapter on {', '.join(missing)} (adapted: {', '.join(adapters) or 'none'})"
    for path, ad in adapters.items():
        if len(ad.shape) == 3 and ad.num_experts != spec.num_experts:
            return f"{path}: adapter has {ad.num_experts} experts, block has {spec.num_experts}"
    _seed_factors(adapters, seed)
    merged = _merged_canonical(entry, params, adapters, base)

    # Tokens drawn against the *adapted* weights: the routing margin and clamp distances hold for W + ΔW.
    batch, seq = TOKENS
    idle = spec.num_experts + IDLE_EXPERT
    gen = torch.Generator().manual_seed(seed * CASE_SEED_STRIDE + sum(map(ord, "lora_experts")))
    tokens = select_tokens(
        spec,
        merged,
        token_pool(spec.hidden, 4096, torch.float32, gen),
        batch * seq,
        lambda index: ~(index == idle).any(dim=-1),
        "lora_experts (last expert idle)",
    )
    hidden = tokens.reshape(batch, seq, spec.hidden)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    grad_output = torch.randn(hidden.shape, generator=gen, dtype=torch.float64).float().double()

    reference = reference_forward(spec, merged, hidden, mask)
    used = set(reference.routing.index.flatten().tolist())
    ref_grads = reference_gradients(spec, merged, hidden, grad_output)

    adapted.train(entry.train_mode)
    x = hidden.float().requires_grad_(True)
    out = _first(adapted(x)).reshape(x.shape)
    out.backward(grad_output.float())
    return _Run(
        adapters=adapters,
        output=out.detach(),
        hidden=hidden,
        mask=mask,
        grad_output=grad_output,
        merged_params=merged,
        ref_output=reference.output,
        ref_grads=ref_grads,
        routed=sorted(used),
        idle=[e for e in range(spec.num_experts) if e not in used],
        adapted=adapted,
    )


def _grad(t: nn.Parameter) -> torch.Tensor | None:
    return None if t.grad is None else t.grad.detach().double()


def _check_forward(run: _Run) -> Outcome:
    out = compare("output", run.output, run.ref_output, TOLERANCES["fp32"]["output"])
    return Outcome(
        out.passed,
        out.max_abs_err,
        out.max_rel_err,
        out.tol,
        out.message and f"adapted block vs reference on W + ΔW: {out.message}",
    )


def _expert_adapters(run: _Run) -> list[Adapter]:
    return [ad for ad in run.adapters.values() if len(ad.shape) == 3]


def _check_routed(run: _Run) -> Outcome:
    problems = []
    for ad in run.adapters.values():
        experts = run.routed if len(ad.shape) == 3 else [0]
        for factor, tensor in (("lora_A", ad.lora_a), ("lora_B", ad.lora_b)):
            grad = _grad(tensor)
            if grad is None:
                problems.append(f"{ad.path}.{factor}: no gradient (None)")
                continue
            for e in experts:
                where, index = expert_slices(ad, e)[factor] if len(ad.shape) == 3 else ("", (slice(None),))
                if not bool((grad[index] != 0).any()):
                    problems.append(f"{ad.path}.{factor} {where} (expert {e}, routed): gradient is all zero")
    if problems:
        return Outcome(
            False, message="; ".join(problems[:6]) + (f" (+{len(problems) - 6} more)" if len(problems) > 6 else "")
        )
    return Outcome(True, message=f"routed experts {run.routed}: every adapter slice has a non-zero gradient")


def _check_idle(run: _Run) -> Outcome:
    if not run.idle:
        return Outcome(None, message="every expert received a token")
    problems = []
    worst = 0.0
    for ad in _expert_adapters(run):
        for factor, tensor in (("lora_A", ad.lora_a), ("lora_B", ad.lora_b)):
            grad = _grad(tensor)
            if grad is None:
                problems.append(f"{ad.path}.{factor}: None, not exact zeros")
                continue
            for e in run.idle:
                where, index = expert_slices(ad, e)[factor]
                top = float(grad[index].abs().max())
                worst = max(worst, top)
                if top != 0.0:
                    problems.append(f"{ad.path}.{factor} {where} (expert {e}, no token): max |grad| {top:.3g}")
    if problems:
        return Outcome(False, worst, message="; ".join(problems))
    return Outcome(True, 0.0, message=f"idle experts {run.idle}: exact zeros in every adapter slice")


def _check_grad_reference(entry: ArchEntry, run: _Run) -> Outcome:
    """Adapter grads vs the chain rule through ΔW(A, B) of the reference's weight grads at W + ΔW."""
    bindings = {b.path: b for b in entry.params}
    tol = TOLERANCES["fp32"]["grad"]
    outcomes = []
    for path, ad in run.adapters.items():
        b = bindings[path]
        block_grad = LAYOUTS[b.layout].to_block(*(run.ref_grads[c] for c in b.canonical))
        a = ad.lora_a.detach().double().requires_grad_(True)
        bb = ad.lora_b.detach().double().requires_grad_(True)
        want_a, want_b = torch.autograd.grad(ad.delta(a, bb), (a, bb), block_grad)
        outcomes.append(compare(f"{path}.lora_A.grad", _grad(ad.lora_a), want_a, tol))
        outcomes.append(compare(f"{path}.lora_B.grad", _grad(ad.lora_b), want_b, tol))
    return merge(outcomes)


def _check_merge(entry: ArchEntry, run: _Run, merge_fn: MergeFn, paths: list[str]) -> Outcome:
    """Merged weights == W + ΔW per expert (idle ones too), and the merged block == reference output."""
    # NOTE: the merge consumes the adapted module: run last, after the gradient checks.
    try:
        merged_block = merge_fn(run.adapted)
    except Exception as exc:  # noqa: BLE001
        return Outcome(False, message=f"merge raised {brief_error(exc)}")
    params = dict(merged_block.named_parameters())
    merged, _ = to_canonical(entry, {p: params[p].detach() for p in paths if p in params})
    absent = [p for p in paths if p not in params]
    if absent:
        return Outcome(False, message=f"merged block has no parameter {', '.join(absent)} (adapters not unloaded?)")
    tol = TOLERANCES["fp32"]["output"]
    outcomes = []
    for name, value in merged.items():
        want = run.merged_params[name]
        if value is not None and value.dim() == 3:
            for e in range(value.shape[0]):
                o = compare(f"{name}[expert {e}]", value[e], want[e], tol)
                outcomes.append(
                    o
                    if o.passed
                    else Outcome(False, o.max_abs_err, o.max_rel_err, tol, f"merged {o.message} (W_e + ΔW_e)")
                )
        else:
            outcomes.append(compare(f"merged {name}", value, want, tol))
    with torch.no_grad():
        out = _first(merged_block.train(entry.train_mode)(run.hidden.float())).reshape(run.hidden.shape)
    output = compare("merged block output", out, run.ref_output, tol)
    weights = merge(outcomes)
    both = merge([output, weights])
    # NOTE: the output's verdict first and whole: a dropped delta of an idle expert shows only in the weights.
    message = "; ".join(m for m in (output.message, weights.message) if m)
    return Outcome(both.passed, both.max_abs_err, both.max_rel_err, tol, message)


__all__ = [
    "LORA_CHECKS",
    "Adapter",
    "ApplyLora",
    "LoraTarget",
    "MergeFn",
    "audit_lora_experts",
    "expert_factors",
    "expert_slices",
    "peft_apply_lora",
    "peft_merge",
]
