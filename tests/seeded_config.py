"""Seeded bugs that only a config sample can see: a block that hard-codes the value the tiny config
happens to use (of a flag, of k, of the group count, of the p-norm) instead of reading its config.

At the tiny config each agrees with the reference; at a sample with another value it must go red.
``SEEDED_CONFIG`` maps each to (arch, the sample that exposes it, the checks that must go red).
"""

from __future__ import annotations

from torch import nn

from moeconf.backends import HFBlockBackend
from moeconf.registry import ArchEntry
from moeconf.registry.config_space import ConfigSample


def _router(block: nn.Module, entry: ArchEntry) -> nn.Module:
    return block.get_submodule(entry.router_path)


def _hard_code(module: nn.Module, **values: object) -> None:
    """Overwrite attributes the module reads its config from (each must exist: a seeded bug that silently
    sets an attribute nobody reads would prove nothing)."""
    for name, value in values.items():
        if not hasattr(module, name):
            raise AttributeError(f"{type(module).__name__} has no attribute {name!r} to hard-code")
        setattr(module, name, value)


def _renorm_always(block: nn.Module, entry: ArchEntry) -> None:
    _hard_code(_router(block, entry), norm_topk_prob=True)  # qwen3_moe's tiny config sets True


def _k_two(block: nn.Module, entry: ArchEntry) -> None:
    _hard_code(_router(block, entry), top_k=2)  # the tiny configs' k


def _two_groups(block: nn.Module, entry: ArchEntry) -> None:
    _hard_code(_router(block, entry), num_group=2, topk_group=1)  # deepseek_v3's tiny n_group / topk_group


def _p_two(block: nn.Module, entry: ArchEntry) -> None:
    _hard_code(block, moe_normalize_expert_weights=2.0)  # dbrx's tiny p (DBRX ships p = 1); DbrxFFN reads it


renorm_hardcoded = HFBlockBackend("renorm-hardcoded", patch=_renorm_always)
top_k_hardcoded = HFBlockBackend("top-k-hardcoded", patch=_k_two)
groups_hardcoded = HFBlockBackend("groups-hardcoded", patch=_two_groups)
pnorm_hardcoded = HFBlockBackend("pnorm-hardcoded", patch=_p_two)

ROUTING = {"routing_weights", "output", "grad_input", "grad_router", "grad_experts"}

SEEDED_CONFIG: dict[str, tuple[str, ConfigSample, set[str]]] = {
    # Qwen3MoeConfig's own default is norm_topk_prob=False: the `default` sample exposes it.
    "renorm_hardcoded": ("qwen3_moe", ConfigSample("default", "default", (("norm_topk_prob", None),)), ROUTING),
    # Qwen3-30B-A3B's k = 8 (of 128 experts).
    "top_k_hardcoded": (
        "qwen3_moe",
        ConfigSample("published:k8", "published", (("num_experts", 128), ("num_experts_per_tok", 8))),
        {"routing", "routing_weights", "output"},
    ),
    # DeepSeek-V3's 8 groups, 4 kept (256 experts, k = 8).
    "groups_hardcoded": (
        "deepseek_v3",
        ConfigSample(
            "published:groups",
            "published",
            (("n_routed_experts", 256), ("num_experts_per_tok", 8), ("n_group", 8), ("topk_group", 4)),
        ),
        {"routing", "output"},
    ),
    # DBRX's published moe_normalize_expert_weights = 1.
    "pnorm_hardcoded": (
        "dbrx",
        ConfigSample("published:p1", "published", (("ffn_config.moe_normalize_expert_weights", 1.0),)),
        ROUTING,
    ),
}
