"""Tiny models, batches and the loss a framework's integration is judged on.

Everything here builds from a registry entry, offline: no hub access, a few hundred parameters.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from moeconf.registry import ArchEntry, get_entry
from moeconf.tools import audit

AUX_KNOBS = (audit.AUX_FLAG, *audit.COEF_FIELDS)
"""Config keys that switch the aux loss on or weight it; the integration audits start without them."""


def entry_of(arch: str | ArchEntry) -> ArchEntry:
    """The registry entry of ``arch`` (a model type, or an entry as is)."""
    return arch if isinstance(arch, ArchEntry) else get_entry(arch)


def _without(kwargs: Any, keys: frozenset[str]) -> Any:
    """``kwargs`` with ``keys`` removed at every depth of nested dicts (sub-configs given as dicts)."""
    if isinstance(kwargs, dict):
        return {k: _without(v, keys) for k, v in kwargs.items() if k not in keys}
    return kwargs


def default_config(arch: str | ArchEntry) -> Any:
    """The entry's tiny config with every aux-loss knob left at its config class's default.

    NOTE: the registry's tiny configs pre-set ``output_router_logits=True`` and a coefficient (the
    block checks need them); a framework's configure function must be judged on what *it* sets, so
    those keys (and the entry's own coefficient attribute, e.g. ``moe_loss_weight``) are dropped
    before the config class is called, wherever they sit in nested sub-config dicts.
    """
    import transformers

    entry = entry_of(arch)
    keys = set(AUX_KNOBS)
    if entry.aux_coef_attr:
        keys.add(entry.aux_coef_attr.rpartition(".")[2])
    kwargs = _without(copy.deepcopy(entry.config_kwargs), frozenset(keys))
    return getattr(transformers, entry.config_class)(**kwargs)


def tiny_model(arch: str | ArchEntry, config: Any | None = None, *, device: str | None = None) -> nn.Module:
    """The entry's tiny full model (``entry.model_class``, e.g. ``MixtralForCausalLM``), seeded.

    Args:
        arch: a registered model type (``moeconf list``) or an entry.
        config: the config to build from; default the registry's tiny config.
        device: ``"meta"`` builds without memory (enough to inspect or mark modules).

    Returns:
        The model, float32, on CPU unless ``device`` says otherwise; its first MoE block sits at
        ``entry.block_path`` (``model.layers.0.mlp`` for Mixtral).
    """
    return audit.build_model(entry_of(arch), config, device=device)


def padded_batch(model: nn.Module, *, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    """A seeded causal-LM batch for ``model``, with padding.

    Returns ``input_ids``, ``attention_mask`` and ``labels``, each ``[batch, seq]`` int64. Row 0 is
    left-padded over its first ``seq // 2`` positions (mask 0, label -100); token ids are drawn from
    ``[1, vocab)`` of the model's text config.
    """
    return audit.padded_batch(audit.text_vocab(model.config), batch=batch, seq=seq)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy as transformers' causal-LM loss computes it.

    Args:
        logits: ``[B, S, V]``.
        labels: ``[B, S]``; positions labelled -100 (padding) are ignored.

    Returns:
        A float32 scalar: the mean over labelled positions of ``CE(logits[:, :-1], labels[:, 1:])``.
    """
    return audit.causal_lm_ce(logits, labels)


def moe_blocks(model: nn.Module, entry: ArchEntry) -> dict[str, str]:
    """``{path: class name}`` of every module of the entry's leaf class(es): the MoE blocks.

    NOTE: matched by class name, as ``set_z3_leaf_modules`` matches strings, so a same-named block
    class from remote code counts too.
    """
    wanted = set(entry.zero3_leaves)
    return {path: type(m).__name__ for path, m in model.named_modules() if type(m).__name__ in wanted}


__all__ = ["causal_lm_loss", "default_config", "entry_of", "moe_blocks", "padded_batch", "tiny_model"]
