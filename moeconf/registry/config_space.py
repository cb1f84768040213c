"""The spec as a function of the config: which config fields a block reads, and what each sets in the spec.

One source of truth per entry. ``ArchEntry.spec`` is the *form* of the layer (router family, expert
form, losses); the config fields listed here set everything the config decides (sizes, ``E``, ``k``,
renormalisation, groups, scaling, shared width, capacity). ``derive_spec(entry, config)`` is the spec
the block must compute when it is built from ``config``, whatever the config: the entry's tiny config
is one sample of it (``moeconf.hf.configs`` builds the others).

Most fields are found by name (``COMMON_FIELDS``: the names transformers' MoE configs share); an entry
lists its own in ``ArchEntry.config_fields`` (a field of another name, a dotted sub-config field, or a
common name the block does not read with that meaning: ``FieldRule(name, None, why)``).

A rule never asks whether the block honours the field: that is what the gate tests. A block that
ignores a field its config documents (DeepSeek-V2's ``norm_topk_prob``) disagrees with the derived
spec as soon as a sample sets the field the other way, and is declared with its source line.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from moeconf.spec import MoESpec

Target = Literal[
    "hidden",
    "intermediate",
    "set_intermediates",
    "num_experts",
    "top_k",
    "selected_logits_fn",
    "renorm",
    "pnorm",
    "n_group",
    "topk_group",
    "topk_method",
    "routed_scaling",
    "shared_intermediate",
    "shared_multiple",
    "shared_slots",
    "expert_capacity",
    "logit_softcap",
    "swiglu_limit",
    "swiglu_alpha",
    "sparsemixer_eps",
    "logit_softcap_or_zero",
    "scoring",
    "shared_swiglu_limit",
    "shared_swiglu_alpha",
    "softcap_gate",
    "softcap_up",
    "renorm_eps",
    "per_k_scaling",
    "logit_multiplier",
    "shared_combine",
    "capacity_normalize_before_dropping",
]
"""What a config field sets in the spec (``TARGETS`` says how)."""

SIZE_TARGETS: frozenset[str] = frozenset({"hidden", "intermediate", "set_intermediates"})
"""Targets that only size the tensors: every sample keeps them at the tiny config's values (a sample
exercises routing, and tiny sizes keep every sample fast)."""


@dataclass(frozen=True)
class FieldRule:
    """One config field the block reads, and the spec target it sets.

    ``field``: attribute of the block's config (dotted for a sub-config: ``"ffn_config.moe_top_k"``).
    ``target``: what it sets; None declares that the field, although one of ``COMMON_FIELDS``, does
    not set that target in this block (``why`` says what it is instead).
    ``per``: for ``shared_multiple`` (a count of shared experts fused into one MLP), the config field
    holding one shared expert's width; None: the routed experts' width (DeepSeek's
    ``n_shared_experts × moe_intermediate_size``).
    """

    field: str
    target: Target | None
    why: str = ""
    per: str | None = None

    def __post_init__(self) -> None:
        if self.target is not None and self.target not in TARGETS:
            raise ValueError(
                f"config field {self.field!r}: unknown target {self.target!r}; known: {', '.join(TARGETS)}"
            )
        if self.target is None and not self.why:
            raise ValueError(f"config field {self.field!r}: a field left out of the spec needs its reason (why=)")


def _draft(obj: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` without ``__post_init__``: the rules of one config are applied one field at a
    time, and a half-applied spec (E changed, groups not yet) must not be judged; ``derive_spec``
    validates the whole once every rule is in."""
    new = copy.copy(obj)
    for name, value in changes.items():
        object.__setattr__(new, name, value)
    return new


def _router(spec: MoESpec, **changes: Any) -> MoESpec:
    return _draft(spec, router=_draft(spec.router, **changes))


def _group(spec: MoESpec, **changes: Any) -> MoESpec:
    group = spec.router.group_limit
    assert group is not None  # rule_applies: group targets only with a group-limited template
    if any(v is None for v in changes.values()):
        return spec  # no group count (DeepSeek-V2's default, topk_method="greedy"): topk_method decides
    return _router(spec, group_limit=_draft(group, **changes))


def _topk_method(spec: MoESpec, value: Any) -> MoESpec:
    # DeepSeek-V2: "greedy" ranks every expert, "group_limited_greedy" first keeps topk_group of n_group groups
    # (applied after n_group/topk_group, so that the template's group form survives a greedy sample).
    if value == "greedy":
        return _router(spec, group_limit=None)
    if value == "group_limited_greedy":
        return spec
    raise ValueError(f"topk_method {value!r}: the block knows 'greedy' and 'group_limited_greedy'")


def _renorm(spec: MoESpec, value: Any) -> MoESpec:
    if spec.router.weight_from == "softmax_of_selected_logits":
        return spec  # a softmax over the k already sums to 1: renormalising it changes nothing
    return _router(spec, renorm="always" if value else "never")


def _selected_logits_fn(spec: MoESpec, value: Any) -> MoESpec:
    # Cohere2-MoE's expert_selection_fn: top-k on the logits, then a softmax over the k or a sigmoid of each.
    if value not in ("softmax", "sigmoid"):
        raise ValueError(f"expert_selection_fn {value!r}: the block knows 'softmax' and 'sigmoid'")
    return _router(spec, weight_from=f"{value}_of_selected_logits", renorm="never")


def _set_intermediates(spec: MoESpec, value: Any) -> MoESpec:
    # ERNIE-4.5-VL: one expert width per token set, set 0's is the spec's own.
    widths = tuple(int(v) for v in value)
    sets = spec.token_sets
    assert sets is not None  # rule_applies: only for a spec with token sets
    return _draft(spec, intermediate=widths[0], token_sets=_draft(sets, intermediates=widths))


def _pnorm(spec: MoESpec, value: Any) -> MoESpec:
    # DBRX: top_weights / top_weights.norm(p) when moe_normalize_expert_weights is set, else as they are.
    return _router(spec, renorm="never") if value is None else _router(spec, renorm="pnorm", renorm_p=float(value))


def _shared(spec: MoESpec, width: int) -> MoESpec:
    assert spec.shared is not None  # rule_applies: shared targets only with a shared template
    return _draft(spec, shared=_draft(spec.shared, intermediate=int(width)))


def _capacity(spec: MoESpec, value: Any) -> MoESpec:
    assert spec.router.capacity is not None
    return _router(spec, capacity=_draft(spec.router.capacity, capacity=int(value)))


def _experts(spec: MoESpec, **changes: Any) -> MoESpec:
    return _draft(spec, experts=_draft(spec.experts, **changes))


def _shared_mlp(spec: MoESpec, **changes: Any) -> MoESpec:
    assert spec.shared is not None and spec.shared.mlp is not None  # rule_applies: a shared MLP of its own form
    return _draft(spec, shared=_draft(spec.shared, mlp=_draft(spec.shared.mlp, **changes)))


def _shared_combine(spec: MoESpec, value: Any) -> MoESpec:
    if value not in ("sum", "average"):
        raise ValueError(f"shared_expert_combination_strategy {value!r}: the block knows 'sum' and 'average'")
    assert spec.shared is not None  # rule_applies: only with a shared MLP
    return _draft(spec, shared=_draft(spec.shared, combine=value))


TARGETS: dict[str, Callable[[MoESpec, Any], MoESpec]] = {
    "hidden": lambda s, v: _draft(s, hidden=int(v)),
    "intermediate": lambda s, v: _draft(s, intermediate=int(v)),
    "set_intermediates": _set_intermediates,
    "num_experts": lambda s, v: _draft(s, num_experts=int(v)),
    "top_k": lambda s, v: _draft(s, top_k=int(v)),
    "selected_logits_fn": _selected_logits_fn,
    "renorm": _renorm,
    "pnorm": _pnorm,
    "n_group": lambda s, v: _group(s, n_group=None if v is None else int(v)),
    "topk_group": lambda s, v: _group(s, topk_group=None if v is None else int(v)),
    "topk_method": _topk_method,
    "routed_scaling": lambda s, v: _router(s, routed_scaling=float(v)),
    "shared_intermediate": _shared,
    # one fused shared MLP of n × the width of one (derive_spec passes the product: FieldRule.per)
    "shared_multiple": _shared,
    "shared_slots": lambda s, v: _router(s, shared_slots=int(v)),
    "expert_capacity": _capacity,
    "logit_softcap": lambda s, v: _router(s, logit_softcap=None if v is None else float(v)),
    "swiglu_limit": lambda s, v: _experts(s, gptoss_limit=float(v)),
    "swiglu_alpha": lambda s, v: _experts(s, gptoss_alpha=float(v)),
    "sparsemixer_eps": lambda s, v: _router(s, sparsemixer_eps=float(v)),
    # Laguna's moe_router_logit_softcapping: a float whose 0.0 means "no cap" (the config refuses None)
    "logit_softcap_or_zero": lambda s, v: _router(s, logit_softcap=float(v) if v and float(v) > 0 else None),
    # DeepSeek-V4 / Inkling2 scoring_func (ACT2FN[scoring_func] of the logits)
    "scoring": lambda s, v: _router(s, scoring=str(v)),
    # a shared MLP that clamps with the routed experts' limit / alpha (GLM-5-Next, MiniMax-M3, DeepSeek-V4)
    "shared_swiglu_limit": lambda s, v: _shared_mlp(s, gptoss_limit=float(v)),
    "shared_swiglu_alpha": lambda s, v: _shared_mlp(s, gptoss_alpha=float(v)),
    # Inkling2 mlp_gate_softcap / mlp_up_softcap
    "softcap_gate": lambda s, v: _experts(s, softcap_gate=float(v)),
    "softcap_up": lambda s, v: _experts(s, softcap_up=float(v)),
    # ERNIE-4.5's moe_norm_min: the floor (renorm_clamp) or epsilon of the renormalising sum
    "renorm_eps": lambda s, v: _router(s, renorm_eps=float(v)),
    # OpenAI privacy filter: the router returns w / k and the block multiplies the routed output by k
    "per_k_scaling": lambda s, v: _router(s, routed_scaling=1 / int(v), output_scale=float(v)),
    # Muse Spark's output_multiplier: the router logits × a constant before the scoring function
    "logit_multiplier": lambda s, v: _router(s, logit_multiplier=float(v)),
    # Cohere2-MoE's shared_expert_combination_strategy: routed + shared ("sum") or their mean ("average")
    "shared_combine": _shared_combine,
    # NLLB-MoE's normalize_router_prob_before_dropping: True renormalises the top-2 before the capacity drops
    # (a dropped slot keeps its share), False over the kept slots only (Capacity.renorm_kept)
    "capacity_normalize_before_dropping": lambda s, v: _router(
        s, renorm="always" if v else s.router.renorm, capacity=_draft(s.router.capacity, renorm_kept=not bool(v))
    ),
}
"""How each target sets the spec, in the order they are applied (sizes and counts first)."""

COMMON_FIELDS: tuple[tuple[str, Target], ...] = (
    ("hidden_size", "hidden"),
    ("d_model", "hidden"),
    ("moe_intermediate_size", "intermediate"),
    ("intermediate_size", "intermediate"),
    ("num_experts", "num_experts"),
    ("num_local_experts", "num_experts"),
    ("n_routed_experts", "num_experts"),
    ("moe_num_experts", "num_experts"),
    ("num_experts_per_tok", "top_k"),
    ("moe_topk", "top_k"),
    ("moe_k", "top_k"),
    ("norm_topk_prob", "renorm"),
    ("n_group", "n_group"),
    ("topk_group", "topk_group"),
    ("routed_scaling_factor", "routed_scaling"),
    ("shared_expert_intermediate_size", "shared_intermediate"),
    ("n_shared_experts", "shared_multiple"),
    ("n_shared_experts", "shared_slots"),
    ("expert_capacity", "expert_capacity"),
)
"""Field names transformers' MoE configs share, in priority order: the first one a config has sets its
target (``moe_intermediate_size`` before the dense ``intermediate_size``)."""


def rule_applies(target: Target, template: MoESpec) -> bool:
    """Whether ``target`` has a place in a spec of ``template``'s form (a group count needs a
    group-limited router, a shared width a shared MLP of its own width, ...)."""
    router = template.router
    if target in ("n_group", "topk_group", "topk_method"):
        return router.group_limit is not None
    if target in ("shared_intermediate", "shared_multiple"):
        return template.shared is not None and template.shared.gate != "router"
    if target == "shared_slots":
        return template.shared is not None and template.shared.gate == "router"
    if target == "set_intermediates":
        return template.token_sets is not None
    if target == "renorm":
        return router.renorm in ("always", "never") and router.weight_from != "sparsemixer"
    if target == "expert_capacity":
        return router.capacity is not None
    if target in ("swiglu_limit", "swiglu_alpha"):
        return template.experts.glu != "swiglu"
    if target in ("shared_swiglu_limit", "shared_swiglu_alpha"):
        return template.shared is not None and template.shared.mlp is not None and template.shared.mlp.glu != "swiglu"
    if target in ("softcap_gate", "softcap_up"):
        return template.experts.glu == "softcapped_swiglu"
    if target == "shared_combine":
        return template.shared is not None
    if target == "capacity_normalize_before_dropping":
        return router.capacity is not None
    return True


def _has(config: Any, field: str) -> bool:
    try:
        read_field(config, field)
    except (AttributeError, KeyError):
        return False
    # NOTE: any other error (a per-layer attribute of a heterogeneous config refusing a global read) means
    # the field exists but needs an entry's own rule: it propagates, naming the field.
    return True


def read_field(config: Any, field: str) -> Any:
    """``config.<field>`` (dotted: through sub-configs, or dicts such as DBRX's ``ffn_config``)."""
    obj = config
    for part in field.split("."):
        obj = obj[part] if isinstance(obj, Mapping) else getattr(obj, part)
    return obj


def config_rules(
    template: MoESpec, own: Iterable[FieldRule], config: Any, token_set_fields: bool = False
) -> tuple[FieldRule, ...]:
    """The fields of ``config`` that set the spec, in ``TARGETS`` order: the entry's ``own`` rules, then
    the first ``COMMON_FIELDS`` name of every other target that ``config`` has and ``template`` has a
    place for. A field an own rule declares ``None`` is left out."""
    # an own rule whose field this release's config lacks (GPT-OSS's swiglu_alpha before it was a field)
    # rules nothing here: the block of that release does not read it
    own = tuple(r for r in own if r.target is None or _has(config, r.field))
    declared = {r.field for r in own}
    ruled = {r.target for r in own if r.target is not None}
    rules = [r for r in own if r.target is not None]
    aliases = getattr(type(config), "attribute_map", {}) or {}
    for name, target in COMMON_FIELDS:
        # a config attribute that is an alias (DeepseekV3Config: num_local_experts → n_routed_experts) is ruled
        # by the name it stands for, which is the one config.json and the registry's kwargs spell
        field = aliases.get(name, name)
        if target in ruled or field in declared or not rule_applies(target, template) or not _has(config, field):
            continue
        rules.append(FieldRule(field, target))
        ruled.add(target)
    order = list(TARGETS)
    return tuple(sorted(rules, key=lambda r: order.index(r.target)))  # type: ignore[arg-type]


class InvalidConfig(ValueError):
    """The config describes no valid MoE layer (k > E, groups that do not divide E, ...)."""


def derive_spec(template: MoESpec, rules: Iterable[FieldRule], config: Any) -> MoESpec:
    """The spec a block built from ``config`` must compute: ``template`` with every rule's field read
    from ``config``. Raises ``InvalidConfig`` when the values describe no valid layer."""
    spec = template
    try:
        for rule in rules:
            assert rule.target is not None
            value = read_field(config, rule.field)
            if rule.target == "shared_multiple":
                value = int(value) * (int(read_field(config, rule.per)) if rule.per else spec.intermediate)
            spec = TARGETS[rule.target](spec, value)
        return dataclasses.replace(spec)  # runs MoESpec's validation on the combined values
    except (ValueError, TypeError) as exc:
        raise InvalidConfig(str(exc)) from exc


ConfigKind = Literal["tiny", "default", "published", "hypothesis", "invalid"]
CONFIG_KINDS: tuple[ConfigKind, ...] = ("tiny", "default", "published", "hypothesis", "invalid")
"""``invalid``: configs that describe no valid layer (k > E, groups that do not divide E, ...): the config
class or the block must reject them (check ``config_rejects_invalid``)."""


@dataclass(frozen=True)
class Published:
    """A released checkpoint's routing-relevant config values.

    ``repo``: the checkpoint's hub id; its ``config.json`` is the source (``source``). ``values``: the
    block config's fields as published (dotted for sub-configs). Sizes are left out: every sample runs
    at tiny sizes, with the checkpoint's expert count, k, groups and flags.
    """

    repo: str
    values: Mapping[str, Any]
    revision: str = "main"

    @property
    def name(self) -> str:
        return "published:" + self.repo.rsplit("/", 1)[-1].lower()

    @property
    def source(self) -> str:
        return f"https://huggingface.co/{self.repo}/blob/{self.revision}/config.json"


@dataclass(frozen=True)
class ConfigSample:
    """One named config of an entry: its routing fields set over the tiny config.

    ``name``: ``tiny``, ``default``, ``published:<checkpoint>``, ``hypothesis:<i>`` or ``invalid:<what>``; it appears in
    records, in ``repro`` and on the CLI (``--config``). ``values``: ``(field, value)`` pairs of the
    block config (dotted for sub-configs) set over the tiny config; a ``default`` sample's ``None``
    means "the config class's default" (the field is removed). ``bias``: the trained selection-bias
    state the inputs draw, as
    ``router.selection_bias = offset + scale · N(0, 1)`` (None: the usual draw); a large negative offset
    puts every biased score below zero, which is what exposes a group mask filled with 0 instead of −inf.
    """

    name: str
    kind: ConfigKind
    values: tuple[tuple[str, Any], ...] = ()
    source: str = ""
    bias: tuple[float, float] | None = None

    @property
    def fields(self) -> dict[str, Any]:
        return dict(self.values)

    def describe(self) -> str:
        parts = [f"{k}={v!r}" for k, v in self.values]
        if self.bias is not None:
            parts.append(f"selection bias offset {self.bias[0]:g}, scale {self.bias[1]:g}")
        return ", ".join(parts) or "as registered"


TINY = ConfigSample("tiny", "tiny")
