"""Pure-torch emulator of the torch_npu MoE ops (``npu_moe_token_permute``, ``npu_moe_token_unpermute``,
``npu_grouped_matmul``, ``npu_swiglu``).

The signatures match torch_npu, so NPU MoE code runs unchanged on a CPU (see ``fake_torch_npu``). The semantics,
shapes, dtypes, rejections and gradients are written up, op by op, in docs/torch-npu-ops.md (sections named after
the ops); the comments below point there by op name.

Emulator decisions where torch_npu's own documentation is silent or inconsistent (each documented at the function
it affects):

- Arithmetic runs in fp32 and is cast back to the input dtype, the way the NPU kernels accumulate low-precision
  inputs. ``npu_moe_token_permute``/``unpermute`` and ``npu_swiglu`` accept fp16, bf16 and fp32 (the CANN
  ``aclnnMoeTokenPermute`` reference lists all three; one torch_npu docstring says bf16 only).
- ``npu_grouped_matmul``'s accepted float dtypes depend on the torch_npu release: see ``TorchNpuRules`` and
  docs/torch-npu-ops.md, 'Release rules'. The default is the newest documented release, so a framework is never
  flagged for a call its torch_npu accepts.
- Dropped slots: when ``num_out_tokens`` keeps fewer than ``T*K`` rows, ``sorted_indices`` stays the full inverse
  permutation, so the dropped slots point at rows ``>= num_out_tokens``. Every op treats such an entry as "absent":
  it contributes zero to the unpermute output, to ``grad_probs`` and to the permute gradient.
- ``npu_grouped_matmul`` has no autograd (torch_npu registers no derivative for it): its outputs carry a grad_fn
  whose backward raises ``RuntimeError``, so a missing wrapper fails loudly instead of silently dropping gradients.
  ``grouped_matmul_autograd`` is the LLaMA-Factory-style wrapper.

Every argument rejection is a one-line ``ValueError`` (``NpuOpRejected``) of the form
``"<op>(): '<argument>' <reason> (called at <file>:<line> in <function>)"``, located at the caller's line.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from types import FrameType, ModuleType
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_RULES",
    "MAX_GROUPS",
    "MAX_INDEX",
    "MAX_INNER_DIM",
    "MAX_TOPK",
    "RULES",
    "RULES_ENV",
    "NpuOpRejected",
    "TorchNpuRules",
    "current_rules",
    "grouped_matmul_autograd",
    "npu_grouped_matmul",
    "npu_moe_token_permute",
    "npu_moe_token_unpermute",
    "npu_swiglu",
    "resolve_rules",
    "torch_npu_rules",
]

# Limits: docs/torch-npu-ops.md, 'npu_moe_token_permute' and 'npu_grouped_matmul'.
MAX_TOPK = 512  # top-k (indices.size(1) / probs.size(1)) <= 512
MAX_INDEX = 16_777_215  # numel and expert ids must be below this (the kernel sorts them as float)
MAX_GROUPS = 1024  # at most 1024 groups for the single-tensor grouped form
MAX_MULTI_TENSORS = 128  # at most 128 tensors in the multi-tensor (list) forms
MAX_INNER_DIM = 65_536  # the inner (contiguous) dim of each grouped-matmul tensor must be < 65536

# --------------------------------------------------------------------------------------------------------------------
# release rules (docs/torch-npu-ops.md, 'Release rules')
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchNpuRules:
    """What one torch_npu release accepts where releases differ.

    Attributes:
        version: the Ascend Extension for PyTorch release (``"6.0"``, ``"7.0"``), not the torch_npu wheel version.
        gmm_dtypes: float dtypes ``npu_grouped_matmul`` accepts for ``x`` and ``weight`` (int8 is not emulated).
        source: where the rule is documented.
    """

    version: str
    gmm_dtypes: tuple[torch.dtype, ...]
    source: str


RULES: dict[str, TorchNpuRules] = {
    "6.0": TorchNpuRules(
        "6.0",
        (torch.float16, torch.bfloat16),
        "torch_npu 6.0.0 API reference, npu_grouped_matmul: x and weight float16, bfloat16 or int8",
    ),
    "7.0": TorchNpuRules(
        "7.0",
        (torch.float16, torch.bfloat16, torch.float32),
        "torch_npu 7.0.0 API reference, npu_grouped_matmul: x float16, float32, bfloat16 or int8 on Atlas A2/A3 "
        "(float32 only when x, weight and y are single tensors)",
    ),
}
"""Documented rule sets, by release. A requested release uses the newest rule set not newer than it."""

DEFAULT_RULES = "7.0"
"""The newest documented rules: what the emulator enforces unless told otherwise."""

RULES_ENV = "MOECONF_TORCH_NPU_RULES"
"""Environment variable that selects the rules (e.g. ``6.0``) when no ``torch_npu_rules()`` block is active."""

_VERSION = re.compile(r"^v?(\d+)(?:\.(\d+))?")
_active_rules: list[TorchNpuRules] = []


def _version_key(version: str) -> tuple[int, int]:
    match = _VERSION.match(version.strip().lower())
    if match is None:
        raise ValueError(f"torch_npu release {version!r} is not a version such as '6.0' or '7.0.0'")
    return int(match.group(1)), int(match.group(2) or 0)


def resolve_rules(version: str | TorchNpuRules | None = None) -> TorchNpuRules:
    """The rules for a torch_npu release: ``"6.0"``, ``"6.0.0"``, ``"6.0.rc3"``, ``"7.0"``, ``"7.1.0"`` ...

    A release uses the newest documented rule set not newer than it (``"7.1"`` gets the 7.0 rules); a release older
    than every documented one raises ``ValueError``. ``None`` means the current rules (``current_rules()``).
    """
    if isinstance(version, TorchNpuRules):
        return version
    if version is None:
        return current_rules()
    wanted = _version_key(str(version))
    known = sorted(RULES.values(), key=lambda r: _version_key(r.version))
    usable = [r for r in known if _version_key(r.version) <= wanted]
    if not usable:
        raise ValueError(f"no documented torch_npu rules for release {version!r}; known releases: {', '.join(RULES)}")
    return usable[-1]


def current_rules() -> TorchNpuRules:
    """The rules in force: the innermost ``torch_npu_rules()`` block, else ``$MOECONF_TORCH_NPU_RULES``, else the
    newest documented rules (``DEFAULT_RULES``)."""
    if _active_rules:
        return _active_rules[-1]
    requested = os.environ.get(RULES_ENV, "").strip()
    if not requested:
        return RULES[DEFAULT_RULES]
    try:
        return resolve_rules(requested)
    except ValueError as exc:
        raise ValueError(f"{RULES_ENV}={requested!r}: {exc}") from None


@contextlib.contextmanager
def torch_npu_rules(version: str | TorchNpuRules | None) -> Iterator[TorchNpuRules]:
    """Enforce one release's rules inside the block (process-wide, like the ``torch_npu`` module entry); nests.

    ``None`` keeps the rules already in force.
    """
    rules = resolve_rules(version)
    _active_rules.append(rules)
    try:
        yield rules
    finally:
        _active_rules.pop()


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
_ACC = torch.float32  # NPU kernels accumulate fp16/bf16 in fp32


# --------------------------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------------------------


class NpuOpRejected(ValueError):
    """A call the torch_npu op would reject, located at the caller's line.

    A real torch_npu op is native code: its rejection's traceback ends at the line that called it. The emulator's
    raise sits several frames deeper, so the message names the call site itself, ``"<op>(): '<argument>' <reason>
    (called at <file>:<line> in <function>)"``: the first frame outside ``moeconf/npu`` and torch (for
    ``grouped_matmul_autograd``'s backward, the line that called the forward). ``call_site`` is ``"<file>:<line>"``
    (relative to the working directory when under it); ``moeconf check`` records show it instead of the emulator's
    own line.
    """

    def __init__(self, op: str, argument: str, reason: str, call_site: str, function: str) -> None:
        where = f" (called at {call_site} in {function})" if call_site else ""
        super().__init__(f"{op}(): '{argument}' {reason}{where}")
        self.op, self.argument, self.reason, self.call_site, self.function = op, argument, reason, call_site, function


_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_backward = threading.local()
"""``sites``: call sites of the ``grouped_matmul_autograd`` forwards whose backward runs in this thread."""


def _shown_path(filename: str) -> str:
    path = os.path.abspath(filename)
    cwd = os.getcwd() + os.sep
    return path.removeprefix(cwd)


def _call_site() -> tuple[str, str]:
    """``("<file>:<line>", function)`` of the first frame outside this package and torch: the caller's line."""
    sites = getattr(_backward, "sites", None)
    if sites and sites[-1][0]:
        return sites[-1]
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        path = os.path.abspath(filename)
        if not filename.startswith("<") and not path.startswith((_OWN_DIR, _TORCH_DIR)):
            return f"{_shown_path(filename)}:{frame.f_lineno}", frame.f_code.co_name
        frame = frame.f_back
    return "", ""


def _fail(op: str, arg: str, reason: str) -> NoReturn:
    site, function = _call_site()
    raise NpuOpRejected(op, arg, reason, site, function)


def _check_tensor(op: str, arg: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        _fail(op, arg, f"must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_float(op: str, arg: str, t: Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        _fail(op, arg, f"dtype must be float16, bfloat16 or float32, got {t.dtype}")


def _check_index_dtype(op: str, arg: str, t: Tensor) -> None:
    if t.dtype not in _INDEX_DTYPES:
        _fail(op, arg, f"dtype must be int32 or int64, got {t.dtype}")


def _check_int(op: str, arg: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(op, arg, f"must be an int, got {type(value).__name__}")
    return value


def _reject_padded(op: str, padded_mode: object) -> None:
    # Only padded_mode=False is implemented by the op (docs/torch-npu-ops.md, 'npu_moe_token_permute').
    if padded_mode is not False:
        _fail(op, "padded_mode", f"only padded_mode=False is supported, got {padded_mode!r}")


def _min_max(t: Tensor) -> tuple[int, int]:
    return int(t.min().item()), int(t.max().item())


# --------------------------------------------------------------------------------------------------------------------
# shared permutation helpers
# --------------------------------------------------------------------------------------------------------------------


def _resolve_num_out(num_out_tokens: int | None, total: int) -> int:
    """``num_out_tokens`` slice semantics: None/0 keep all, n > 0 keeps min(n, total), n < 0 keeps total + n (clamped
    at 0). See docs/torch-npu-ops.md, 'npu_moe_token_permute'."""
    if num_out_tokens is None or num_out_tokens == 0:
        return total
    if num_out_tokens > 0:
        return min(num_out_tokens, total)
    return max(total + num_out_tokens, 0)


def _gather_kept(rows: Tensor, slots: Tensor) -> Tensor:
    """``out[j] = rows[slots[j]]`` in fp32, with zeros where ``slots[j] >= rows.size(0)`` (a dropped slot).

    rows: [P, H]; slots: [N] int64 -> [N, H] fp32.
    """
    num_rows, hidden = rows.shape
    out = rows.new_zeros((slots.numel(), hidden), dtype=_ACC)
    kept = slots < num_rows
    if num_rows == 0 or not bool(kept.any()):
        return out
    out[kept] = rows.index_select(0, slots[kept]).to(_ACC)
    return out


# --------------------------------------------------------------------------------------------------------------------
# npu_moe_token_permute (docs/torch-npu-ops.md, 'npu_moe_token_permute')
# --------------------------------------------------------------------------------------------------------------------


class _TokenPermute(torch.autograd.Function):
    """tokens [T, H], indices [T, K] -> permuted [n, H] (tokens dtype), sorted_indices [T*K] int32."""

    @staticmethod
    def forward(ctx: Any, tokens: Tensor, indices: Tensor, num_out: int) -> tuple[Tensor, Tensor]:
        num_tokens, topk = indices.shape
        # Stable sort by expert: ties keep the flat slot order t*K+k (the op test's argsort(stable=True)).
        order = torch.argsort(indices.reshape(-1).long(), stable=True)
        permuted = tokens.index_select(0, order[:num_out] // topk)
        # torch_npu returns the inverse map (flat slot -> permuted row), always full length.
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        sorted_indices = inverse.to(torch.int32)
        ctx.mark_non_differentiable(sorted_indices)
        ctx.save_for_backward(sorted_indices)
        ctx.shape = (num_tokens, topk)
        ctx.tokens_dtype = tokens.dtype
        return permuted, sorted_indices

    @staticmethod
    def backward(ctx: Any, grad_permuted: Tensor, _grad_sorted: Tensor | None) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (sorted_indices,) = ctx.saved_tensors
        num_tokens, topk = ctx.shape
        # derivatives.yaml (npu_moe_token_permute_grad_v2): grad_tokens[t] = sum_k grad_perm[s[t*K+k]] over kept slots.
        gathered = _gather_kept(grad_permuted, sorted_indices.long())
        grad_tokens = gathered.view(num_tokens, topk, grad_permuted.size(1)).sum(dim=1)
        return grad_tokens.to(ctx.tokens_dtype), None, None


def _check_permute_args(tokens: object, indices: object, num_out_tokens: object) -> tuple[Tensor, Tensor]:
    op = "npu_moe_token_permute"
    tokens = _check_tensor(op, "tokens", tokens)
    indices = _check_tensor(op, "indices", indices)
    if tokens.dim() != 2:
        _fail(op, "tokens", f"must be 2-D [T, H], got shape {tuple(tokens.shape)}")
    _check_float(op, "tokens", tokens)
    _check_index_dtype(op, "indices", indices)
    if indices.dim() not in (1, 2):
        _fail(op, "indices", f"must be [T] or [T, K], got shape {tuple(indices.shape)}")
    # Size checks come before any data access so huge expanded views can be rejected cheaply.
    if indices.numel() >= MAX_INDEX:
        _fail(op, "indices", f"numel must be < {MAX_INDEX}, got {indices.numel()}")
    indices_2d = indices if indices.dim() == 2 else indices.unsqueeze(1)  # [T] means K=1
    if indices_2d.size(1) > MAX_TOPK:
        _fail(op, "indices", f"top-k must be <= {MAX_TOPK}, got {indices_2d.size(1)}")
    if indices_2d.size(0) != tokens.size(0):
        _fail(op, "indices", f"has {indices_2d.size(0)} rows but tokens has {tokens.size(0)}")
    if num_out_tokens is not None:
        _check_int(op, "num_out_tokens", num_out_tokens)
    if indices.numel() > 0:
        lo, hi = _min_max(indices)
        if lo < 0 or hi >= MAX_INDEX:
            _fail(op, "indices", f"values must lie in [0, {MAX_INDEX}), got [{lo}, {hi}]")
    return tokens, indices_2d


def npu_moe_token_permute(
    tokens: Tensor,
    indices: Tensor,
    num_out_tokens: int | None = None,
    padded_mode: bool = False,
) -> tuple[Tensor, Tensor]:
    """Group token copies by expert.

    Args:
        tokens: [T, H], fp16/bf16/fp32 (may be non-contiguous).
        indices: [T, K] or [T] (K=1) expert ids, int32 or int64, values in [0, 16777215); K <= 512.
        num_out_tokens: rows to keep: None/0 all, n > 0 ``min(n, T*K)``, n < 0 ``T*K + n`` (slice semantics).
        padded_mode: only False.

    Returns:
        permuted_tokens: [num_out, H] in tokens' dtype,
            ``tokens[argsort(indices.flatten(), stable=True) // K][:num_out]``.
        sorted_indices: [T*K] int32, the *inverse* map flat slot ``t*K+k`` -> row of ``permuted_tokens``; always full
            length, so dropped slots hold values ``>= num_out``.

    Autograd (tokens only): ``grad_tokens[t] = sum_k grad_permuted[sorted_indices[t*K+k]]`` over the kept copies,
    accumulated in fp32.
    """
    _reject_padded("npu_moe_token_permute", padded_mode)
    tokens, indices_2d = _check_permute_args(tokens, indices, num_out_tokens)
    num_out = _resolve_num_out(num_out_tokens, indices_2d.numel())
    return _TokenPermute.apply(tokens, indices_2d, num_out)


# --------------------------------------------------------------------------------------------------------------------
# npu_moe_token_unpermute (docs/torch-npu-ops.md, 'npu_moe_token_unpermute')
# --------------------------------------------------------------------------------------------------------------------


class _TokenUnpermute(torch.autograd.Function):
    """permuted [P, H], sorted_indices [T*K], probs [T, K] | None -> out [T, H] (permuted dtype)."""

    @staticmethod
    def forward(ctx: Any, permuted: Tensor, sorted_indices: Tensor, probs: Tensor | None) -> Tensor:
        topk = 1 if probs is None else probs.size(1)
        slots = sorted_indices.long()
        # Gather with the inverse map; slots pointing past the kept rows are dropped copies and add zero.
        gathered = _gather_kept(permuted, slots).view(slots.numel() // topk, topk, permuted.size(1))
        if probs is not None:
            gathered = gathered * probs.to(_ACC).unsqueeze(-1)
        out = gathered.sum(dim=1).to(permuted.dtype)
        # permuted_tokens is only needed for grad_probs, so it is not saved when probs is None (as op-plugin does on
        # recent CANN; docs/torch-npu-ops.md, 'npu_moe_token_unpermute').
        saved = (sorted_indices,) if probs is None else (sorted_indices, probs, permuted)
        ctx.save_for_backward(*saved)
        ctx.has_probs = probs is not None
        ctx.permuted_meta = (permuted.size(0), permuted.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        num_rows, permuted_dtype = ctx.permuted_meta
        if ctx.has_probs:
            sorted_indices, probs, permuted = ctx.saved_tensors
            topk = probs.size(1)
        else:
            (sorted_indices,) = ctx.saved_tensors
            probs, permuted, topk = None, None, 1
        slots = sorted_indices.long()
        kept = slots < num_rows
        # Row j = t*K+k of the flat slot space sees grad_out[t].
        grad_rows = grad_out.to(_ACC).repeat_interleave(topk, dim=0)
        grad_permuted = grad_probs = None
        if ctx.needs_input_grad[0]:
            # grad_permuted[s[j]] = probs[j] * grad_out[j // K]; rows no slot points at get zero.
            weighted = grad_rows if probs is None else grad_rows * probs.to(_ACC).reshape(-1, 1)
            acc = grad_out.new_zeros((num_rows, grad_out.size(1)), dtype=_ACC)
            acc.index_add_(0, slots[kept], weighted[kept])
            grad_permuted = acc.to(permuted_dtype)
        if ctx.has_probs and ctx.needs_input_grad[2]:
            # grad_probs[t, k] = <grad_out[t], permuted[s[t*K+k]]>, zero for dropped slots; dtype follows probs.
            dots = (grad_rows * _gather_kept(permuted, slots)).sum(dim=1)
            grad_probs = dots.view_as(probs).to(probs.dtype)
        return grad_permuted, None, grad_probs


def _check_unpermute_args(permuted_tokens: object, sorted_indices: object, probs: object) -> tuple[Tensor, Tensor]:
    op = "npu_moe_token_unpermute"
    permuted_tokens = _check_tensor(op, "permuted_tokens", permuted_tokens)
    sorted_indices = _check_tensor(op, "sorted_indices", sorted_indices)
    if permuted_tokens.dim() != 2:
        _fail(op, "permuted_tokens", f"must be 2-D [P, H], got shape {tuple(permuted_tokens.shape)}")
    _check_float(op, "permuted_tokens", permuted_tokens)
    _check_index_dtype(op, "sorted_indices", sorted_indices)
    if sorted_indices.dim() != 1:
        _fail(op, "sorted_indices", f"must be 1-D [T*K], got shape {tuple(sorted_indices.shape)}")
    num_slots = sorted_indices.numel()
    if num_slots >= MAX_INDEX:
        _fail(op, "sorted_indices", f"numel must be < {MAX_INDEX}, got {num_slots}")
    topk = 1
    if probs is not None:
        probs = _check_tensor(op, "probs", probs)
        _check_float(op, "probs", probs)
        if probs.dim() != 2:
            _fail(op, "probs", f"must be 2-D [T, K], got shape {tuple(probs.shape)}")
        topk = probs.size(1)
        if topk > MAX_TOPK:
            _fail(op, "probs", f"top-k (probs.size(1)) must be <= {MAX_TOPK}, got {topk}")
        # Catches dense [T, E] routing weights passed where top-k [T, K] probs belong (verl PR #4888).
        if probs.numel() != num_slots:
            _fail(op, "probs", f"must have sorted_indices.numel()={num_slots} elements, got shape {tuple(probs.shape)}")
    if permuted_tokens.size(0) > num_slots:
        _fail(op, "permuted_tokens", f"has {permuted_tokens.size(0)} rows, more than the {num_slots} slots")
    if num_slots > 0:
        lo, hi = _min_max(sorted_indices)
        if lo < 0 or hi >= num_slots:
            _fail(op, "sorted_indices", f"values must lie in [0, {num_slots}), got [{lo}, {hi}]")
    return permuted_tokens, sorted_indices


def npu_moe_token_unpermute(
    permuted_tokens: Tensor,
    sorted_indices: Tensor,
    probs: Tensor | None = None,
    padded_mode: bool = False,
    restore_shape: Sequence[int] | None = None,
) -> Tensor:
    """Combine expert outputs back into token order: ``out[t] = sum_k probs[t,k] * permuted[sorted_indices[t*K+k]]``.

    Args:
        permuted_tokens: [P, H], fp16/bf16/fp32; ``P <= T*K`` (``P < T*K`` when permute dropped tokens).
        sorted_indices: [T*K] int32/int64, the inverse map returned by ``npu_moe_token_permute``. Entries ``>= P``
            are dropped copies and contribute zero.
        probs: [T, K] or None (then K=1 and every weight is 1). K = ``probs.size(1)``.
        padded_mode: only False.
        restore_shape: accepted for signature compatibility and ignored (only the padded mode uses it).

    Returns:
        [T*K // K, H] in permuted_tokens' dtype, accumulated in fp32.

    Autograd: ``grad_permuted[s[t*K+k]] = probs[t,k] * grad_out[t]`` and
    ``grad_probs[t,k] = <grad_out[t], permuted[s[t*K+k]]>`` (dtype of probs). permuted_tokens is not saved for
    backward when probs is None.
    """
    del restore_shape  # unused outside padded mode, which is rejected
    _reject_padded("npu_moe_token_unpermute", padded_mode)
    permuted_tokens, sorted_indices = _check_unpermute_args(permuted_tokens, sorted_indices, probs)
    return _TokenUnpermute.apply(permuted_tokens, sorted_indices, probs)


# --------------------------------------------------------------------------------------------------------------------
# npu_grouped_matmul (docs/torch-npu-ops.md, 'npu_grouped_matmul')
# --------------------------------------------------------------------------------------------------------------------

_GMM = "npu_grouped_matmul"


def _inner_dim(t: Tensor) -> int:
    """Size of the memory-contiguous axis: the last dim, or dim -2 for a transposed view such as ``x.T``."""
    if t.dim() >= 2 and t.stride(-1) != 1 and t.stride(-2) == 1:
        return t.size(-2)
    return t.size(-1)


def _check_tensor_list(arg: str, value: object) -> list[Tensor]:
    if not isinstance(value, (list, tuple)) or not value:
        _fail(_GMM, arg, f"must be a non-empty list of tensors, got {type(value).__name__}")
    for i, t in enumerate(value):
        _check_tensor(_GMM, f"{arg}[{i}]", t)
        _check_float(_GMM, f"{arg}[{i}]", t)
        if t.numel() > 0 and _inner_dim(t) >= MAX_INNER_DIM:
            _fail(_GMM, f"{arg}[{i}]", f"inner dim must be < {MAX_INNER_DIM}, got shape {tuple(t.shape)}")
    return list(value)


def _check_unsupported(kwargs: dict[str, Any], dtype: torch.dtype) -> None:
    # Quantization, fused activation and tuning arguments are not emulated; their defaults are accepted: None, an
    # empty tensor list (the older ``scale=[]`` call style), act_type=0, and output_dtype equal to x's dtype.
    for name, value in kwargs.items():
        if value is None or (isinstance(value, (list, tuple)) and not value) or (name == "act_type" and value == 0):
            continue
        if name == "output_dtype" and value == dtype:
            continue
        _fail(_GMM, name, f"is not supported by the emulator (got {value!r}); only None/default is accepted")


def _group_counts(group_list: object, group_list_type: object, rows: int) -> list[int]:
    """Validate ``group_list`` and return per-group row counts.

    group_list: int tensor [E] or python list[int] (list form = increasing cumulative sums, the ``.List`` overload).
    group_list_type: 0 = cumulative sums (last == rows), 1 = counts (sum == rows).
    """
    if group_list is None:
        _fail(_GMM, "group_list", "is required when group_type is 0 or 2")
    if group_list_type not in (0, 1):
        _fail(_GMM, "group_list_type", f"must be 0 (cumsum) or 1 (counts), got {group_list_type!r}")
    if isinstance(group_list, Tensor):
        if group_list.dtype not in _INDEX_DTYPES or group_list.dim() != 1:
            _fail(
                _GMM,
                "group_list",
                f"must be a 1-D int64/int32 tensor, got {group_list.dtype} {tuple(group_list.shape)}",
            )
        values = [int(v) for v in group_list.tolist()]
    elif isinstance(group_list, (list, tuple)):
        if group_list_type != 0:
            _fail(_GMM, "group_list_type", "must be 0 when group_list is a python list (the list form is cumulative)")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in group_list):
            _fail(_GMM, "group_list", "python list must contain ints")
        values = list(group_list)
    else:
        _fail(_GMM, "group_list", f"must be a tensor or a list of ints, got {type(group_list).__name__}")
    if not values:
        _fail(_GMM, "group_list", "must have at least one group")
    if len(values) > MAX_GROUPS:
        _fail(_GMM, "group_list", f"has {len(values)} groups, more than {MAX_GROUPS}")
    if group_list_type == 1:
        if min(values) < 0:
            _fail(_GMM, "group_list", f"counts must be non-negative, got {values}")
        counts = values
    else:
        if values[0] < 0 or any(b < a for a, b in pairwise(values)):
            _fail(_GMM, "group_list", f"cumulative sums must be non-negative and non-decreasing, got {values}")
        counts = [b - a for a, b in pairwise([0, *values])]
    total = sum(counts)
    if total > rows:
        _fail(_GMM, "group_list", f"covers {total} rows, more than the {rows} available")
    if total != rows:
        _fail(_GMM, "group_list", f"covers {total} rows but must cover all {rows}")
    return counts


def _offsets(counts: list[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for count in counts:
        bounds.append((start, start + count))
        start += count
    return bounds


def _check_split_item(split_item: object) -> None:
    if split_item not in (2, 3):
        _fail(_GMM, "split_item", f"must be 2 or 3 for the single-tensor grouped form, got {split_item!r}")


def _check_single(x: list[Tensor], weight: list[Tensor]) -> None:
    if len(x) != 1 or len(weight) != 1:
        _fail(_GMM, "x", f"grouped form needs exactly one x and one weight tensor, got {len(x)} and {len(weight)}")


def _check_bias_dtype(arg: str, bias: Tensor, dtype: torch.dtype) -> None:
    # bf16 matmuls take an fp32 bias; fp16/fp32 take a bias of their own dtype.
    expected = torch.float32 if dtype == torch.bfloat16 else dtype
    if bias.dtype != expected:
        _fail(_GMM, arg, f"dtype must be {expected} for {dtype} inputs, got {bias.dtype}")


def _gmm_m_axis(x: Tensor, weight: Tensor, bias: Tensor | None, group_list: object, group_list_type: object) -> Tensor:
    """group_type 0: x [M, K], weight [E, K, N], bias [E, N] | None -> y [M, N]; rows of group e use weight[e]."""
    if x.dim() != 2:
        _fail(_GMM, "x", f"must be 2-D [M, K] for group_type=0, got shape {tuple(x.shape)}")
    if weight.dim() != 3 or weight.size(1) != x.size(1):
        _fail(_GMM, "weight", f"must be [E, K={x.size(1)}, N] for group_type=0, got shape {tuple(weight.shape)}")
    counts = _group_counts(group_list, group_list_type, x.size(0))
    if len(counts) != weight.size(0):
        _fail(_GMM, "group_list", f"has {len(counts)} groups but weight has E={weight.size(0)}")
    num_experts, _, n = weight.shape
    if bias is not None:
        if bias.shape != (num_experts, n):
            _fail(_GMM, "bias", f"must be [E={num_experts}, N={n}], got shape {tuple(bias.shape)}")
        _check_bias_dtype("bias", bias, x.dtype)
    y = x.new_empty((x.size(0), n))
    for expert, (start, end) in enumerate(_offsets(counts)):
        if end == start:
            continue  # an empty group writes no rows
        block = x[start:end].to(_ACC) @ weight[expert].to(_ACC)
        if bias is not None:
            block = block + bias[expert].to(_ACC)
        y[start:end] = block.to(y.dtype)
    return y


def _gmm_k_axis(x: Tensor, dy: Tensor, group_list: object, group_list_type: object) -> Tensor:
    """group_type 2: x [K, M] (activations transposed), dy [M, N] -> out [E, K, N].

    ``out[e] = x[:, rows_e] @ dy[rows_e]``; an empty group gives an exact zero [K, N] block.
    """
    if x.dim() != 2:
        _fail(_GMM, "x", f"must be 2-D [K, M] for group_type=2, got shape {tuple(x.shape)}")
    if dy.dim() != 2 or dy.size(0) != x.size(1):
        _fail(_GMM, "weight", f"must be [M={x.size(1)}, N] for group_type=2, got shape {tuple(dy.shape)}")
    counts = _group_counts(group_list, group_list_type, x.size(1))
    out = x.new_zeros((len(counts), x.size(0), dy.size(1)))
    for expert, (start, end) in enumerate(_offsets(counts)):
        if end > start:
            out[expert] = (x[:, start:end].to(_ACC) @ dy[start:end].to(_ACC)).to(out.dtype)
    return out


def _gmm_ungrouped(
    x: list[Tensor], weight: list[Tensor], bias: list[Tensor] | None, split_item: object
) -> list[Tensor]:
    """group_type -1 (no grouping): ``y_i = x_i @ weight_i (+ bias_i)``, x_i [M_i, K_i], weight_i [K_i, N_i]."""
    if split_item not in (0, 1):
        _fail(_GMM, "split_item", f"only 0/1 (one output per weight) is emulated for group_type=-1, got {split_item!r}")
    if len(x) != len(weight) or len(x) > MAX_MULTI_TENSORS:
        _fail(_GMM, "weight", f"needs one weight per x (at most {MAX_MULTI_TENSORS}), got {len(x)} x and {len(weight)}")
    if len(x) > 1 and x[0].dtype == torch.float32:
        _fail(_GMM, "x", "float32 is only supported for the all-single-tensor form")
    if bias is not None and len(bias) != len(weight):
        _fail(_GMM, "bias", f"needs one bias per weight, got {len(bias)} for {len(weight)} weights")
    outputs = []
    for i, (xi, wi) in enumerate(zip(x, weight, strict=True)):
        if xi.dim() != 2 or wi.dim() != 2 or xi.size(1) != wi.size(0):
            _fail(
                _GMM,
                f"weight[{i}]",
                f"must be [K, N] matching x[{i}] [M, K], got {tuple(wi.shape)} and {tuple(xi.shape)}",
            )
        yi = xi.to(_ACC) @ wi.to(_ACC)
        if bias is not None:
            if bias[i].shape != (wi.size(1),):
                _fail(_GMM, f"bias[{i}]", f"must be [N={wi.size(1)}], got shape {tuple(bias[i].shape)}")
            _check_bias_dtype(f"bias[{i}]", bias[i], xi.dtype)
            yi = yi + bias[i].to(_ACC)
        outputs.append(yi.to(xi.dtype))
    return outputs


def _gmm_dispatch(
    x: list[Tensor],
    weight: list[Tensor],
    bias: list[Tensor] | None,
    group_list: object,
    split_item: object,
    group_type: object,
    group_list_type: object,
) -> list[Tensor]:
    if group_type is None or group_type == -1:
        if group_list is not None:
            _fail(_GMM, "group_list", "must be None when group_type is -1 (no grouping)")
        return _gmm_ungrouped(x, weight, bias, split_item)
    if group_type == 1:
        _fail(_GMM, "group_type", "N-axis grouping (group_type=1) is not supported")
    if group_type not in (0, 2):
        _fail(_GMM, "group_type", f"must be -1, 0 or 2, got {group_type!r}")
    _check_single(x, weight)
    _check_split_item(split_item)
    if group_list_type == 2:
        _fail(
            _GMM, "group_list_type", "2 ([groupIdx, groupSize] pairs) is only supported for int8, which is not emulated"
        )
    if bias is not None and len(bias) != 1:
        _fail(_GMM, "bias", f"must hold one tensor for the single-tensor form, got {len(bias)}")
    if group_type == 2:
        if bias is not None:
            _fail(_GMM, "bias", "is not supported with group_type=2")
        return [_gmm_k_axis(x[0], weight[0], group_list, group_list_type)]
    return [_gmm_m_axis(x[0], weight[0], None if bias is None else bias[0], group_list, group_list_type)]


class _NoAutograd(torch.autograd.Function):
    """Runs a computation whose outputs refuse to backpropagate, like an op with no derivative registered."""

    @staticmethod
    def forward(ctx: Any, compute: Callable[[], list[Tensor]], *inputs: Tensor) -> tuple[Tensor, ...]:
        del inputs  # only passed so autograd links the outputs to them
        return tuple(compute())

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> NoReturn:
        raise RuntimeError(
            "npu_grouped_matmul has no autograd (torch_npu registers no derivative); wrap it in an "
            "autograd.Function such as moeconf.npu.emulator.grouped_matmul_autograd"
        )


def _check_release_dtypes(rules: TorchNpuRules, x: list[Tensor], weight: list[Tensor]) -> None:
    """Reject x/weight dtypes the selected torch_npu release does not list (docs/torch-npu-ops.md, 'Release rules')."""
    allowed = ", ".join(str(d).removeprefix("torch.") for d in rules.gmm_dtypes)
    for arg, tensors in (("x", x), ("weight", weight)):
        for i, t in enumerate(tensors):
            if t.dtype not in rules.gmm_dtypes:
                _fail(
                    _GMM,
                    f"{arg}[{i}]",
                    f"dtype {t.dtype} is not accepted by torch_npu {rules.version} (accepted: {allowed}); select the "
                    f"release your framework runs with: emulated_torch_npu(version=...) or {RULES_ENV}",
                )


def npu_grouped_matmul(
    x: list[Tensor],
    weight: list[Tensor],
    *,
    bias: list[Tensor] | None = None,
    group_list: Tensor | list[int] | None = None,
    split_item: int | None = 0,
    group_type: int | None = None,
    group_list_type: int | None = 0,
    **unsupported_kwargs: Any,
) -> list[Tensor]:
    """Grouped matmul ``y_i = x_i @ weight_i (+ bias_i)``; weights are in matmul layout [K, N].

    Forms:
        group_type 0 (M-axis, the MoE forward): x [[M, K]], weight [[E, K, N]], bias [[E, N]] | None -> [[M, N]].
        group_type 2 (K-axis, the MoE weight gradient): x [[K, M]] (``x.T``), weight [[M, N]] (``dy``) -> [[E, K, N]];
            an empty group gives an exact zero [K, N] block.
        group_type None/-1 (no grouping): lists of 2-D x_i/weight_i, split_item 0/1 -> one output per weight.
    group_list: tensor [E] (int64/int32) or python list (cumulative only). group_list_type 0 = cumulative sums,
        1 = counts; it must cover exactly the grouped axis (M). split_item must be 2/3 for the grouped forms.

    dtypes: x and weight share one float dtype, which the torch_npu release in force must accept
    (``current_rules()``: fp16/bf16 under the 6.0 rules, fp16/bf16/fp32 under the 7.0 rules, float32 only for the
    all-single-tensor forms). fp16/bf16 are computed in fp32 and cast back; bias is fp32 for bf16 inputs.
    Quantization / activation kwargs are accepted only at their defaults. No autograd: outputs that would require
    grad raise on backward.
    """
    x = _check_tensor_list("x", x)
    weight = _check_tensor_list("weight", weight)
    _check_unsupported(unsupported_kwargs, x[0].dtype)
    _check_release_dtypes(current_rules(), x, weight)
    if any(t.dtype != x[0].dtype for t in [*x, *weight]):
        _fail(_GMM, "weight", f"x and weight must share one dtype, got {[t.dtype for t in [*x, *weight]]}")
    if bias is not None:
        if not isinstance(bias, (list, tuple)) or not all(isinstance(b, Tensor) for b in bias):
            _fail(_GMM, "bias", f"must be a list of tensors or None, got {type(bias).__name__}")
        bias = list(bias) or None  # bias=[] (the older call style) means no bias
    inputs = [*x, *weight, *(bias or [])]

    def compute() -> list[Tensor]:
        return _gmm_dispatch(x, weight, bias, group_list, split_item, group_type, group_list_type)

    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return list(_NoAutograd.apply(compute, *inputs))
    return compute()


class _GroupedMatmulFn(torch.autograd.Function):
    """LLaMA-Factory ``GmmFunction``: y = gmm(x, w) with dx = gmm(dy, w^T) and dw = gmm_k(x^T, dy)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, counts: Tensor, gmm: Callable[..., list[Tensor]]) -> Tensor:
        ctx.save_for_backward(x, weight, counts)
        ctx.gmm = gmm
        site, function = _call_site()
        ctx.site = (site, f"{function}, in its backward") if site else ("", "")
        return gmm([x], [weight], group_list=counts, split_item=2, group_type=0, group_list_type=1)[0]

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, weight, counts = ctx.saved_tensors
        gmm = ctx.gmm
        grad_x = grad_w = None
        # A rejection in here names the line that called the forward (the backward's own caller is torch).
        sites = _backward.__dict__.setdefault("sites", [])
        sites.append(ctx.site)
        try:
            if ctx.needs_input_grad[0]:
                grad_x = gmm(
                    [grad_y], [weight.transpose(1, 2)], group_list=counts, split_item=2, group_type=0, group_list_type=1
                )[0]
            if ctx.needs_input_grad[1]:
                grad_w = gmm([x.T], [grad_y], group_list=counts, split_item=3, group_type=2, group_list_type=1)[0]
        finally:
            sites.pop()
        return grad_x, grad_w, None, None


def grouped_matmul_autograd(
    x: Tensor, weight: Tensor, counts: Tensor | Sequence[int], *, ops: ModuleType | None = None
) -> Tensor:
    """Differentiable grouped matmul built from ``npu_grouped_matmul`` the way LLaMA-Factory wraps it.

    Args:
        x: [M, K] rows sorted by group.
        weight: [E, K, N] (matmul layout; transpose HF ``[E, N, K]`` weights first).
        counts: [E] rows per group (group_list_type=1); a python sequence is turned into an int64 tensor.
        ops: a module with ``npu_grouped_matmul`` (the real torch_npu on an NPU); defaults to this emulator.

    Returns:
        y [M, N]. Backward: dx via group_type 0 with ``weight.transpose(1, 2)``, dw [E, K, N] via group_type 2.
    """
    if not isinstance(counts, Tensor):
        counts = torch.tensor(list(counts), dtype=torch.int64)
    gmm = npu_grouped_matmul if ops is None else ops.npu_grouped_matmul
    return _GroupedMatmulFn.apply(x, weight, counts, gmm)


# --------------------------------------------------------------------------------------------------------------------
# npu_swiglu (docs/torch-npu-ops.md, 'npu_swiglu')
# --------------------------------------------------------------------------------------------------------------------


class _Swiglu(torch.autograd.Function):
    """x [..., 2D, ...] -> silu(A) * B with A, B = x.chunk(2, dim) (A is the gate, the first half)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int) -> Tensor:
        gate, up = x.to(_ACC).chunk(2, dim=dim)
        ctx.save_for_backward(x)
        ctx.dim = dim
        return (F.silu(gate) * up).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        gate, up = x.to(_ACC).chunk(2, dim=ctx.dim)
        grad = grad_out.to(_ACC)
        sig = torch.sigmoid(gate)
        # torch_npu/_inductor/decomposition.py: grad_A = g*B*s*(1 + A*(1-s)), grad_B = g*silu(A).
        grad_gate = grad * up * sig * (1 + gate * (1 - sig))
        grad_up = grad * gate * sig
        return torch.cat([grad_gate, grad_up], dim=ctx.dim).to(x.dtype), None


def npu_swiglu(x: Tensor, dim: int = -1) -> Tensor:
    """SwiGLU: ``A, B = x.chunk(2, dim)``; returns ``silu(A) * B`` with ``x.size(dim) // 2`` along ``dim``.

    x: fp16/bf16/fp32, 1-8 dims, contiguous, non-empty, even size along ``dim``. Computed in fp32, cast back.
    """
    op = "npu_swiglu"
    x = _check_tensor(op, "x", x)
    _check_float(op, "x", x)
    dim = _check_int(op, "dim", dim)
    if not 1 <= x.dim() <= 8:
        _fail(op, "x", f"must have 1 to 8 dims, got {x.dim()}")
    if not -x.dim() <= dim < x.dim():
        _fail(op, "dim", f"must be in [{-x.dim()}, {x.dim()}), got {dim}")
    if x.numel() == 0:
        _fail(op, "x", f"must not be empty, got shape {tuple(x.shape)}")
    if x.size(dim) % 2 != 0:
        _fail(op, "dim", f"split dim must have even size, got {x.size(dim)} (shape {tuple(x.shape)})")
    if not x.is_contiguous():
        _fail(op, "x", "must be contiguous")
    return _Swiglu.apply(x, dim % x.dim())
