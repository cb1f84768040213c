"""Step 4 of discover: readings of the block's tensors as canonical parameters (``Binding``s).

Roles come from parameter names (gate / up / gate_up / down, ``*_bias``), layouts from shapes (the tiny
sizes make H ≠ I ≠ 2I, so a shape names one layout); what shapes cannot tell (concatenated vs
interleaved gate/up, the MLP's activation or clamp form) becomes separate forms to try.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moeconf.registry.entry import Binding
from moeconf.registry.layouts import LAYOUTS
from moeconf.spec import ExpertSpec, SharedSpec
from moeconf.tools.discover.facts import BlockFacts, MlpHints, mlp_hints
from moeconf.tools.discover.locate import SHARED_NAME

GPTOSS_ALPHA = 1.702
"""GPT-OSS's gate sharpness (``sigmoid(α·gate)``), used when the module and config name no alpha."""

NORM_EPS_DEFAULT = 1e-6
"""Output-norm epsilon when the norm module names none (RMSNorm's usual default)."""

ROLE_PATTERNS = (
    ("gate_up", re.compile(r"gate_up|input_linear|w13|wi$")),
    ("gate", re.compile(r"gate|(^|\.)w1$|wi_0")),
    ("up", re.compile(r"up|(^|\.)v1$|(^|\.)w3$|wi_1")),
    ("down", re.compile(r"down|output_linear|(^|\.)w2$|wo$")),
)
"""Expert tensor name → role, first match wins (``gate_up`` before ``gate``)."""


@dataclass(frozen=True)
class Form:
    """One way of reading a part of the block: bindings plus the spec fields it implies."""

    label: str
    bindings: tuple[Binding, ...]
    spec: dict[str, Any] = field(default_factory=dict)


def router_bindings(facts: BlockFacts) -> tuple[Binding, ...]:
    """The router weight ``[E, H]``, its logit bias ``[E]`` and selection-only bias, where the block has them."""
    bindings: tuple[Binding, ...] = (Binding(facts.router_weight, ("router.weight",)),)
    if facts.router_bias:
        bindings += (Binding(facts.router_bias, ("router.bias",)),)
    if facts.selection_bias:
        path, layout = facts.selection_bias
        bindings += (Binding(path, ("router.selection_bias",), layout),)
    return bindings


def mlp_forms(hints: MlpHints, gated: bool) -> list[tuple[str, dict[str, Any]]]:
    """``(label, ExpertSpec fields)`` for every MLP form the hints allow: the activation(s) for a plain
    (Swi)GLU or non-gated MLP, plus clamped / GPT-OSS / soft-capped forms where the constants exist."""
    acts = list(
        dict.fromkeys(([hints.activation] if hints.activation else []) + (["relu2"] if not gated else []) + ["silu"])
    )
    if not gated:
        return [(f"non-gated {a}", {"glu": "none", "activation": a}) for a in acts]
    forms: list[tuple[str, dict[str, Any]]] = [(f"swiglu({a})", {"glu": "swiglu", "activation": a}) for a in acts]
    if hints.limit is not None:
        for glu in ("clamped_swiglu", "clamped_after_act"):
            forms += [
                (f"{glu}({a}, L={hints.limit:g})", {"glu": glu, "activation": a, "gptoss_limit": hints.limit})
                for a in acts
            ]
        gptoss = {"glu": "gptoss_clamped", "gptoss_limit": hints.limit, "gptoss_alpha": hints.alpha or GPTOSS_ALPHA}
        forms.append((f"gptoss_clamped(L={hints.limit:g})", gptoss))  # its activation is the formula's own
    if hints.softcaps is not None:
        gate_cap, up_cap = hints.softcaps
        softcapped = {"glu": "softcapped_swiglu", "softcap_gate": gate_cap, "softcap_up": up_cap}
        forms.append((f"softcapped_swiglu({gate_cap:g}, {up_cap:g})", softcapped))
    return forms


# --- experts ----------------------------------------------------------------------------------------------


def _role(name: str) -> str | None:
    leaf = name.rsplit(".", 1)[-1] if not name.endswith("weight") else name.rsplit(".", 2)[-2]
    leaf = leaf.removesuffix("_bias")
    return next((role for role, pattern in ROLE_PATTERNS if pattern.search(leaf)), None)


def _intermediate(down: torch.Tensor, E: int, H: int) -> int | None:
    """I from the down projection: ``[E, H, I]``, ``[E, I, H]`` or flat ``[E·I, H]`` (DBRX)."""
    shape = tuple(down.shape)
    if len(shape) == 3 and shape[0] == E and H in shape[1:]:
        return shape[2] if shape[1] == H else shape[1]
    if len(shape) == 2 and shape[1] == H and shape[0] % E == 0:
        return shape[0] // E
    return None


def _layout_of(t: torch.Tensor, E: int, H: int, inter: int, role: str) -> str | None:
    """Layout of one expert tensor with canonical shape ``[E, I, H]`` (gate/up) or ``[E, H, I]`` (down)."""
    canonical = (E, H, inter) if role == "down" else (E, inter, H)
    shape = tuple(t.shape)
    if shape == canonical:
        return "identity"
    if shape == (canonical[0], canonical[2], canonical[1]):
        return "transposed"
    if shape == (E * inter, H):
        return "flat_experts_transposed" if role == "down" else "flat_experts"
    return None


Roles = dict[str, tuple[str, torch.Tensor]]
"""Role (``gate``, ``up``, ``gate_up``, ``down``, ``*_bias``) → (block path, tensor)."""


def _expert_roles(block: nn.Module, prefix: str) -> Roles | str:
    """The trainable expert tensors under ``prefix`` by role; why not, when a tensor has no role."""
    roles: Roles = {}
    for name, tensor in block.named_parameters():
        if not name.startswith(prefix) or not tensor.requires_grad:
            continue
        role = _role(name[len(prefix) :])
        if role is None:
            return f"expert parameter {name} has no recognisable role"
        roles[role + ("_bias" if "bias" in name.rsplit(".", 1)[-1] else "")] = (name, tensor)
    return roles


GATE_UP = ("experts.w_gate", "experts.w_up")


def _gate_up_readings(roles: Roles, E: int, H: int, inter: int) -> list[tuple[str, list[Binding], bool]] | str:
    """``(label, bindings, gated)`` for the gate/up projection(s); why not, when none fits."""
    if "gate_up" in roles:
        name, t = roles["gate_up"]
        shape = tuple(t.shape)
        if shape == (E, 2 * inter, H):
            return [("fused rows [E,2I,H]", [Binding(name, GATE_UP, "gate_up_rows")], True)]
        if shape == (E, H, 2 * inter):
            return [
                ("fused transposed [E,H,2I]", [Binding(name, GATE_UP, "gate_up_cols")], True),
                ("fused transposed interleaved", [Binding(name, GATE_UP, "gate_up_cols_interleaved")], True),
            ]
        return f"gate_up {name} {shape} does not fit E={E}, H={H}, I={inter}"
    if "up" not in roles:
        return "no gate/up projection among the expert parameters"
    parts = []
    for role in ("gate", "up"):
        if role in roles:
            name, t = roles[role]
            layout = _layout_of(t, E, H, inter, role)
            if layout is None:
                return f"{role} {name} {tuple(t.shape)} does not fit E={E}, H={H}, I={inter}"
            parts.append(Binding(name, (f"experts.w_{role}",), layout))
    gated = "gate" in roles
    return [(f"separate {'gate/up' if gated else 'up'} ({parts[-1].layout})", parts, gated)]


def _bias_bindings(roles: Roles, E: int, inter: int, interleaved: bool) -> list[Binding] | None:
    """The expert biases (none is an empty list); None when a fused bias has no layout moeconf knows."""
    out: list[Binding] = []
    if "gate_up_bias" in roles:
        name, t = roles["gate_up_bias"]
        layout = "gate_up_bias_interleaved" if interleaved else "gate_up_bias_cat"
        if tuple(t.shape) != (E, 2 * inter) or layout not in LAYOUTS:
            return None
        out.append(Binding(name, ("experts.b_gate", "experts.b_up"), layout))
    for role in ("gate", "up"):
        if f"{role}_bias" in roles:
            out.append(Binding(roles[f"{role}_bias"][0], (f"experts.b_{role}",)))
    if "down_bias" in roles:
        out.append(Binding(roles["down_bias"][0], ("experts.b_down",)))
    return out


def expert_forms(block: nn.Module, facts: BlockFacts) -> tuple[list[Form], str | None]:
    """Expert readings ``(forms, why-none)``; each form's spec holds the ExpertSpec fields plus ``intermediate``."""
    E, H = facts.num_experts, facts.hidden
    roles = _expert_roles(block, facts.experts_path + ".")
    if isinstance(roles, str):
        return [], roles
    if "down" not in roles:
        return [], "no down projection among the expert parameters"
    down_name, down = roles["down"]
    inter = _intermediate(down, E, H)
    down_layout = None if inter is None else _layout_of(down, E, H, inter, "down")
    if inter is None or down_layout is None:
        return [], f"down projection {down_name} {tuple(down.shape)} does not fit E={E}, H={H}"
    readings = _gate_up_readings(roles, E, H, inter)
    if isinstance(readings, str):
        return [], readings
    down_binding = Binding(down_name, ("experts.w_down",), down_layout)
    forms = []
    for label, parts, gated in readings:
        biases = _bias_bindings(roles, E, inter, parts[0].layout == "gate_up_cols_interleaved")
        if biases is None:
            continue
        for mlp_label, mlp in mlp_forms(facts.mlp, gated):
            spec = {**mlp, "bias": bool(biases), "intermediate": inter}
            bindings = tuple(parts) + (down_binding,) + tuple(biases)
            forms.append(Form(f"{label}, {mlp_label}" + (", biases" if biases else ""), bindings, spec))
    return forms, None if forms else "expert biases in a layout moeconf has no binding for"


# --- shared experts -----------------------------------------------------------------------------------


def _linear_weight(module: nn.Module, name: str) -> torch.Tensor | None:
    child = getattr(module, name, None)
    return child.weight if isinstance(child, nn.Linear) else None


def _shared_projections(name: str, module: nn.Module, hidden: int) -> tuple[tuple[Binding, ...], int, bool] | None:
    """Bindings of a shared MLP made of ``nn.Linear`` projections (gate/up/down, fused gate_up/down, or
    up/down), its width ``S`` and whether it is gated; None when it is not such an MLP."""
    down = _linear_weight(module, "down_proj")
    if down is None or down.shape[0] != hidden:
        return None
    width = int(down.shape[1])
    fused = _linear_weight(module, "gate_up_proj")
    binds: tuple[Binding, ...]
    if fused is not None and tuple(fused.shape) == (2 * width, hidden):
        binds = (Binding(f"{name}.gate_up_proj.weight", ("shared.w_gate", "shared.w_up"), "gate_up_rows"),)
        gated = True
    elif _linear_weight(module, "up_proj") is not None:
        gated = _linear_weight(module, "gate_proj") is not None
        projections = ("gate", "up") if gated else ("up",)
        binds = tuple(Binding(f"{name}.{p}_proj.weight", (f"shared.w_{p}",)) for p in projections)
    else:
        return None
    return binds + (Binding(f"{name}.down_proj.weight", ("shared.w_down",)),), width, gated


def _shared_spec(width: int, gate: str, combine: str, mlp: dict[str, Any]) -> SharedSpec:
    """A plain SwiGLU is written with the ``activation`` shorthand; other forms need ``mlp``."""
    plain = mlp["glu"] == "swiglu"
    return SharedSpec(
        width,
        gate=gate,  # type: ignore[arg-type]
        activation=mlp["activation"] if plain else "silu",
        combine=combine,  # type: ignore[arg-type]
        mlp=None if plain else ExpertSpec(**mlp),
    )


def shared_forms(block: nn.Module, facts: BlockFacts, config: Any) -> tuple[list[Form], str | None]:
    """Shared-expert readings: none, or an MLP (plain / clamped / non-gated ..., ungated or sigmoid-gated
    by a ``[1, H]`` weight), combined by sum or average."""
    children = [(n, c) for n, c in block.named_children() if SHARED_NAME.search(n) and not isinstance(c, nn.Linear)]
    if not children:
        return [Form("none", (), {"shared": None})], None
    name, module = children[0]
    found = _shared_projections(name, module, facts.hidden)
    if found is None:
        return [], f"shared expert(s) {name} ({type(module).__name__}) are not an MLP of nn.Linear projections"
    bindings, width, gated = found
    if any(isinstance(m, nn.Linear) and m.bias is not None for m in module.modules()):
        return [], f"shared MLP {name} has biases (no canonical parameter for them)"
    gate = next(
        (
            n
            for n, p in block.named_parameters()
            if SHARED_NAME.search(n) and "gate" in n.split(".")[0] and tuple(p.shape) == (1, facts.hidden)
        ),
        None,
    )
    if gate is not None:
        bindings += (Binding(gate, ("shared.gate",)),)
    gate_kind = "sigmoid" if gate is not None else "none"
    label = f"{name} ({'sigmoid-gated' if gate is not None else 'ungated'})"
    return [
        Form(f"{label} {mlp_label}, {combine}", bindings, {"shared": _shared_spec(width, gate_kind, combine, mlp)})
        for mlp_label, mlp in mlp_forms(mlp_hints(module, config), gated)
        for combine in ("sum", "average")
    ], None


# --- other block children -----------------------------------------------------------------------------


def _norm_eps(module: nn.Module) -> float:
    return next(
        (getattr(module, a) for a in ("variance_epsilon", "eps") if isinstance(getattr(module, a, None), float)),
        NORM_EPS_DEFAULT,
    )


def extra_forms(block: nn.Module, facts: BlockFacts) -> tuple[Form, str | None]:
    """Bindings outside router/experts/shared: an RMSNorm ``[H]`` on the block output (AXK1)."""
    extra: list[Binding] = []
    spec: dict[str, Any] = {}
    for name, child in block.named_children():
        params = [(n, p) for n, p in child.named_parameters() if p.requires_grad]
        if name in (facts.router_path, facts.experts_path) or SHARED_NAME.search(name) or not params:
            continue
        if "norm" in name.lower() and len(params) == 1 and tuple(params[0][1].shape) == (facts.hidden,):
            extra.append(Binding(f"{name}.{params[0][0]}", ("output_norm.weight",)))
            spec["output_norm_eps"] = _norm_eps(child)
            continue
        return Form("", ()), f"block child {name} ({type(child).__name__}) has parameters moeconf cannot bind"
    return Form("output norm" if extra else "", tuple(extra), spec), None
