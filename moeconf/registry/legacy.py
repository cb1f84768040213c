"""transformers 4.x variants of registry entries (per-expert ``ModuleList`` experts).

transformers 5 stores experts as fused 3-D parameters; 4.57 kept one ``nn.Module`` per expert, called
only for experts that received tokens. That is where the ZeRO-3 fetch-order hang and the ZeRO-2 /
FSDP None-grad hang really bite (docs/regression-cases.md #1, #2), so the partitioning suite
runs these entries under transformers 4.57. Only overrides are listed; the rest of the entry holds.
"""

from __future__ import annotations

from typing import Any

from moeconf.registry.core import E
from moeconf.registry.entry import Binding
from moeconf.spec import GroupLimit


def per_expert(names: tuple[str, str, str]) -> tuple[Binding, ...]:
    """Bindings of ``experts.{e}.<gate>/<up>/<down>.weight`` for every expert ``e``."""
    gate, up, down = names
    return tuple(
        Binding(f"experts.{e}.{module}.weight", (canonical,), expert=e)
        for e in range(E)
        for module, canonical in ((gate, "experts.w_gate"), (up, "experts.w_up"), (down, "experts.w_down"))
    )


SHARED_MLP = tuple(Binding(f"shared_experts.{m}_proj.weight", (f"shared.w_{m}",)) for m in ("gate", "up", "down"))

LEGACY_4X: dict[str, dict[str, Any]] = {
    # 4.57: router is a bare nn.Linear (records logits); routing happens inside the block's forward.
    "mixtral": dict(
        params=(Binding("gate.weight", ("router.weight",)),) + per_expert(("w1", "w3", "w2")),
        router_logits_index=None,
        routing_from="none",
        experts_implementations=("eager",),
    ),
    "qwen3_moe": dict(
        params=(Binding("gate.weight", ("router.weight",)),) + per_expert(("gate_proj", "up_proj", "down_proj")),
        router_logits_index=None,
        routing_from="none",
        experts_implementations=("eager",),
    ),
    # 4.57: the router returns (topk_indices, topk_weights) and fills masked groups with 0.0, not -inf.
    "deepseek_v3": dict(
        params=(
            Binding("gate.weight", ("router.weight",)),
            Binding("gate.e_score_correction_bias", ("router.selection_bias",)),
        )
        + per_expert(("gate_proj", "up_proj", "down_proj"))
        + SHARED_MLP,
        routing_from="router_index_weights",
        experts_implementations=("eager",),
        spec_router=dict(group_limit=GroupLimit(n_group=2, topk_group=1, fill="zero")),
    ),
}
