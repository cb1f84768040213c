"""Step 5 of discover: candidate specs for one block, each a complete ``ArchEntry`` to test.

Router candidates cover the router families the reference implements (softmax / sigmoid /
sqrt-softplus scores, top-k on scores or on logits, with or without renormalisation, a p-norm), with
the options the block and config allow (logit and selection biases, soft-capping, group-limited
top-k, routed scaling on the weights or the output). Expert and shared forms come from
``bindings``. ``source_affinity`` tells numerically equivalent readings apart by the source code.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass
from typing import Any

from moeconf.registry.entry import ArchEntry
from moeconf.spec import ExpertSpec, GroupLimit, LossSpec, MoESpec, RouterSpec
from moeconf.tools.discover.bindings import Form, router_bindings
from moeconf.tools.discover.config import (
    N_GROUP_FIELDS,
    SCALING_FIELDS,
    TOPK_GROUP_FIELDS,
    config_fields,
    config_int,
    config_value,
)
from moeconf.tools.discover.facts import BlockFacts, SourceHints, source_of

RENORM_EPS = {"softmax": 0.0, "sigmoid": 1e-20, "sqrtsoftplus": 1e-20}
"""Epsilon added to the renormalising sum: none for softmax, DeepSeek-V3's ``1e-20`` for the others."""

SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus")
GROUP_FORMS = tuple((score, fill) for score in ("top2sum", "max") for fill in ("-inf", "zero"))
"""Group score (sum of the two best experts / the best) × fill of the masked groups."""


@dataclass(frozen=True)
class RouterCandidate:
    """One router reading: a label, the ``RouterSpec``, and where the routing weight applies."""

    label: str
    spec: RouterSpec
    weight_site: str = "output"


def _softcap(config: Any) -> float | None:
    """The router logit soft-cap the config declares (0 / None: no soft-capping)."""
    value = next(
        (
            float(getattr(config, n))
            for n in config_fields(type(config))
            if "softcap" in n and "router" in n and isinstance(getattr(config, n, None), (int, float))
        ),
        None,
    )
    return value or None


def _families(biased: bool, config: Any) -> list[tuple[str, dict[str, Any]]]:
    """``(label, RouterSpec fields)`` of every router family to try."""
    plus_bias = "+bias" if biased else ""
    families: list[tuple[str, dict[str, Any]]] = [
        (
            f"{scoring}{plus_bias}→top-k{'→renorm' if renorm == 'always' else ''}",
            {"scoring": scoring, "renorm": renorm, "renorm_eps": RENORM_EPS[scoring] if renorm == "always" else 0.0},
        )
        for scoring in SCORINGS
        for renorm in ("never", "always")
    ]
    p = config_value(config, ("moe_normalize_expert_weights",)) or config_value(
        getattr(config, "ffn_config", None), ("moe_normalize_expert_weights",)
    )
    if isinstance(p, (int, float)) and p not in (1, 1.0):  # DBRX: weights / ‖weights‖_p
        families.append((f"softmax→top-k→{p}-norm", {"scoring": "softmax", "renorm": "pnorm", "renorm_p": float(p)}))
    families.append(
        (
            "top-k(logits)→softmax",
            {"scoring": "softmax", "select_on": "logits", "weight_from": "softmax_of_selected_logits"},
        )
    )
    for renorm in ("never", "always"):
        families.append(
            (
                f"top-k(logits{plus_bias})→sigmoid{'→renorm' if renorm == 'always' else ''}",
                {
                    "scoring": "sigmoid",
                    "select_on": "logits",
                    "weight_from": "sigmoid_of_selected_logits",
                    "renorm": renorm,
                },
            )
        )
    return families


def _group_limits(facts: BlockFacts, config: Any) -> list[GroupLimit | None]:
    """No group limit, plus every group form where the config declares usable groups."""
    n_group = config_int(config, N_GROUP_FIELDS) or 0
    topk_group = config_int(config, TOPK_GROUP_FIELDS) or 0
    if n_group > 1 and facts.num_experts % n_group == 0 and 0 < topk_group <= n_group:
        return [None] + [GroupLimit(n_group, topk_group, score, fill) for score, fill in GROUP_FORMS]  # type: ignore[arg-type]
    return [None]


def _scalings(config: Any) -> list[tuple[float, str]]:
    """``(λ, site)``: none, plus the config's routed scaling on the weights or on the output."""
    scale = config_value(config, SCALING_FIELDS)
    if isinstance(scale, (int, float)) and float(scale) != 1.0:
        return [(1.0, "weights"), (float(scale), "weights"), (float(scale), "output")]
    return [(1.0, "weights")]


def _label(family: str, group: GroupLimit | None, scaling: float, site: str) -> str:
    text = family + (f", groups {group.n_group}/{group.topk_group} {group.score} fill {group.fill}" if group else "")
    return text + (f", λ={scaling:g}@{site}" if scaling != 1.0 else "")


def router_candidates(facts: BlockFacts, config: Any) -> list[RouterCandidate]:
    """Every router family × group form × scaling the block and config allow; where the experts see
    pre-weighted inputs (dense router scores), also with the weight applied to the expert input."""
    biased = facts.selection_bias is not None
    base: dict[str, Any] = {"logit_bias": facts.router_bias is not None, "selection_bias": biased}
    if softcap := _softcap(config):
        base["logit_softcap"] = softcap
    groups, scalings = _group_limits(facts, config), _scalings(config)
    out = []
    for family, kwargs in _families(biased, config):
        on_scores = kwargs.get("select_on", "scores") == "scores"  # groups are formed from scores
        for group in groups if on_scores else [None]:
            for scaling, site in scalings:
                spec = RouterSpec(**{**base, **kwargs}, group_limit=group, routed_scaling=scaling, scaling_site=site)  # type: ignore[arg-type]
                label = _label(family, group, scaling, site)
                out.append(RouterCandidate(label, spec))
                if facts.routing_from == "router_dense_scores":
                    out.append(RouterCandidate(label + ", weight scales input", spec, weight_site="input"))
    k = facts.top_k
    if k > 1:  # OpenAI privacy filter: softmax weights of the top-k logits divided by k, routed output × k
        spec = RouterSpec(
            **base,
            select_on="logits",
            weight_from="softmax_of_selected_logits",
            routed_scaling=1 / k,
            output_scale=float(k),
        )
        out.append(RouterCandidate(f"top-k(logits)→softmax, weights/{k}, output×{k}", spec))
    return out


def source_affinity(candidate: RouterCandidate, glu: str, hints: SourceHints) -> int:
    """How well a candidate agrees with the source; breaks ties between numerically equivalent
    readings (top-k on logits→softmax ≡ softmax→top-k→renorm; sigmoid is monotone; group fill value;
    clamp forms)."""
    r = candidate.spec
    score = int((r.select_on == "logits") == hints.topk_on_logits)
    if r.group_limit is not None:
        score += int((r.group_limit.fill == "zero") == hints.zero_fill)
    if glu in ("clamped_swiglu", "clamped_after_act", "gptoss_clamped"):
        score += int((glu == "clamped_after_act") == hints.clamp_after_act)
        score += int((glu == "gptoss_clamped") == hints.alpha)
        score += 1 if hints.clamps else -1
    return score


def simplicity(candidate: RouterCandidate) -> int:
    """Minus the options a router reading uses: of two equivalent readings, the plainer is proposed."""
    r = candidate.spec
    return (
        -(r.renorm != "never")
        - (r.group_limit is not None)
        - (r.routed_scaling != 1.0)
        - (candidate.weight_site != "output")
    )


def losses_of(modeling_module: str) -> tuple[LossSpec, str | None]:
    """Aux loss iff the modeling module calls its ``load_balancing_loss_func`` (besides defining it);
    the coefficient attribute from the source (``config.router_aux_loss_coef``, ``config.ffn_config.moe_loss_weight`` ...)."""
    module = importlib.import_module(modeling_module)
    source = source_of(module)
    if not hasattr(module, "load_balancing_loss_func") or len(re.findall(r"load_balancing_loss_func\(", source)) < 2:
        return LossSpec(), None
    coefs = re.findall(r"config((?:\.\w+)*)\.(\w*(?:aux_loss_coef|loss_weight))\b", source)
    if not coefs:
        return LossSpec(aux="switch"), None
    path, name = coefs[0]
    return LossSpec(aux="switch"), (path.lstrip(".") + "." if path else "") + name


@dataclass(frozen=True)
class BlockReading:
    """What every candidate of one block shares: the probe entry (site fields), the facts, the extra
    bindings (output norm) and the losses."""

    model_type: str
    probe: ArchEntry
    facts: BlockFacts
    extra: Form
    losses: LossSpec
    aux_coef_attr: str | None

    def entry(self, router: RouterCandidate, experts: Form, shared: Form) -> ArchEntry:
        """The candidate as a registry entry (``ValueError`` when the spec rejects the combination)."""
        facts, form = self.facts, dict(experts.spec)
        intermediate = form.pop("intermediate")
        spec = MoESpec(
            facts.num_experts,
            facts.top_k,
            facts.hidden,
            intermediate,
            router=router.spec,
            experts=ExpertSpec(**form, weight_site=router.weight_site),
            shared=shared.spec["shared"],
            losses=self.losses,
            **self.extra.spec,
        )
        return dataclasses.replace(
            self.probe,
            model_type=self.model_type,
            spec=spec,
            params=router_bindings(facts) + experts.bindings + shared.bindings + self.extra.bindings,
            router_path=facts.router_path,
            experts_path=facts.experts_path,
            router_logits_index=facts.router_logits_index,
            routing_from=facts.routing_from,  # type: ignore[arg-type]
            aux_coef_attr=self.aux_coef_attr if self.losses.aux != "none" else None,
            # only decorated experts classes switch implementations; the probe has the entry default (all)
            experts_implementations=self.probe.experts_implementations if facts.decorated else ("eager",),
        )
