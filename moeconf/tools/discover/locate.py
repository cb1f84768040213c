"""Step 2 of discover: find the MoE block in a tiny model of the type, without allocating the model.

The model is built on the ``meta`` device; the block is the first module (outside attention) with an
experts child and a router child. It must also be buildable on its own from the config or one of its
sub-configs with the same parameter shapes: that is how the backends build it.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeconf.hf.block import EntryError
from moeconf.registry.entry import ArchEntry
from moeconf.spec import MoESpec
from moeconf.tools.audit import brief_error as brief
from moeconf.tools.audit import config_tree as sub_configs
from moeconf.tools.discover.config import LAYER_COUNTS, drop_key, nested_keys, shrink_kwargs

ROUTER_NAME = re.compile(r"router|gate|gating", re.IGNORECASE)
SHARED_NAME = re.compile(r"shared", re.IGNORECASE)

MAX_BLOCK_NUMEL = 5_000_000
"""The real block is only built when its meta twin is this small (tiny configs give ~20k parameters):
a size field the shrink missed must never be allocated for real."""

CONFIG_RETRIES = 6
"""Keywords dropped, one per retry, when the config class rejects them (each error names one)."""

LOG_TAIL = 6
"""Failed attempts quoted when no block is found (the last ones: the earlier are usually the same)."""

MODEL_MAPPINGS = (
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",  # first: the configuration audit needs ``labels``
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_MAPPING_NAMES",
)
"""transformers' auto mappings searched for a model class of the type, in this order."""

PLACEHOLDER_SPEC = MoESpec(2, 1, 2, 2)
"""Spec of the probe entry, which only builds and observes the block (the real spec is not known yet)."""


def is_experts(name: str, module: nn.Module) -> bool:
    """An experts container: an ``*Expert*`` class, or 3-D projection weights (not a Conv1d's [C, 1, K])."""
    if SHARED_NAME.search(name):  # the attribute name only: class names carry the model's ("GraniteMoeShared...")
        return False
    if "Expert" in type(module).__name__:
        return True
    return any(p.dim() == 3 and re.search(r"proj|linear", n) for n, p in module.named_parameters(recurse=False))


def is_router(name: str, module: nn.Module) -> bool:
    """A router: named like one (attribute or class), with a 2-D weight, not a norm or a shared gate."""
    if SHARED_NAME.search(name) or "norm" in type(module).__name__.lower():
        return False
    named = ROUTER_NAME.search(name) or ROUTER_NAME.search(type(module).__name__)
    return bool(named) and any(p.dim() == 2 for p in module.parameters())


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with an experts child and a router child, outside attention, in model order."""
    blocks = []
    for path, module in model.named_modules():
        children = list(module.named_children())
        has_parts = any(is_experts(n, c) for n, c in children) and any(is_router(n, c) for n, c in children)
        if has_parts and not re.search(r"attn|attention", path, re.IGNORECASE):
            blocks.append((path, module))
    return blocks


@dataclass(frozen=True)
class Site:
    """Where the MoE block lives and how it is built (the entry's fields other than spec and bindings)."""

    config_class: str
    config_kwargs: dict[str, Any]
    model_class: str
    block_path: str
    block_class: str
    modeling_module: str
    block_config_attr: str | None
    block_init: str

    def probe_entry(self) -> ArchEntry:
        """An entry that builds the block (placeholder spec, no bindings); candidates replace the rest."""
        return ArchEntry(
            model_type="discovered",
            config_class=self.config_class,
            config_kwargs=self.config_kwargs,
            modeling_module=self.modeling_module,
            block_class=self.block_class,
            block_path=self.block_path,
            model_class=self.model_class,
            spec=PLACEHOLDER_SPEC,
            params=(),
            router_path="",
            experts_path="",
            block_init=self.block_init,  # type: ignore[arg-type]
            block_config_attr=self.block_config_attr,
        )


def _model_class_names(model_type: str) -> list[str]:
    """Model classes the auto mappings name for the type, in ``MODEL_MAPPINGS`` order."""
    from transformers.models.auto import modeling_auto as auto

    names: list[str] = []
    for mapping in MODEL_MAPPINGS:
        value = getattr(auto, mapping, {}).get(model_type)
        for name in value if isinstance(value, tuple) else (value,):
            if name and name not in names:
                names.append(name)
    return names


def _models_of_config(model_type: str, config_cls: type) -> list[str]:
    """Exported model classes built from ``config_cls`` (types with no auto model class, e.g.
    ``qwen3_omni_moe_text``), causal LMs first."""
    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    folder = model_type_to_module_name(model_type)
    try:
        module = importlib.import_module(f"transformers.models.{folder}.modeling_{folder}")
    except ImportError:
        return []
    names = [
        name
        for name, obj in vars(module).items()
        if isinstance(obj, type)
        and getattr(obj, "config_class", None) is config_cls
        and "PreTrained" not in name
        and getattr(transformers, name, None) is obj
    ]
    return sorted(names, key=lambda n: (not n.endswith("ForCausalLM"), not n.endswith("Model"), n))


def _block_constructor(
    block_cls: type, config: Any, shapes: dict[str, tuple[int, ...]]
) -> tuple[str | None, str] | None:
    """``(block_config_attr, block_init)``: the (sub-)config that builds the block with the model's
    parameter shapes, and whether the constructor also takes ``layer_idx``; None when none does."""
    needs_layer = "layer_idx" in inspect.signature(block_cls).parameters
    for path, sub in sub_configs(config):
        try:
            with torch.device("meta"):
                block = block_cls(sub, layer_idx=0) if needs_layer else block_cls(sub)
        except Exception:  # noqa: BLE001, S112 — this (sub-)config does not build the block: try the next
            continue
        if {n: tuple(p.shape) for n, p in block.named_parameters()} == shapes:
            return path or None, "config_and_layer_idx" if needs_layer else "config"
    return None


def _site_in(model_type: str, config_cls: type, config: Any, kwargs: dict[str, Any], log: list[str]) -> Site | None:
    """The block of the first model class that has one (and can rebuild it alone); attempts go to ``log``."""
    import transformers

    for model_name in _model_class_names(model_type) + _models_of_config(model_type, config_cls):
        model_cls = getattr(transformers, model_name, None)
        if model_cls is None:
            continue
        try:
            with torch.device("meta"):
                model = model_cls(config)
        except Exception as exc:  # noqa: BLE001 — any failure of the model class: log it, try the next
            log.append(f"model {model_name}: {brief(exc)}")
            continue
        blocks = find_blocks(model)
        if not blocks:
            log.append(f"model {model_name}: no module with experts and router children")
            continue
        path, block = blocks[0]
        numel = sum(p.numel() for p in block.parameters())
        if numel > MAX_BLOCK_NUMEL:
            log.append(f"model {model_name}: {type(block).__name__} would have {numel:,} parameters (not tiny)")
            continue
        constructor = _block_constructor(type(block), config, {n: tuple(p.shape) for n, p in block.named_parameters()})
        if constructor is None:
            log.append(f"model {model_name}: {type(block).__name__} could not be rebuilt from the config")
            continue
        return Site(
            config_class=config_cls.__name__,
            config_kwargs=kwargs,
            model_class=model_name,
            block_path=path,
            block_class=type(block).__name__,
            modeling_module=type(block).__module__,
            block_config_attr=constructor[0],
            block_init=constructor[1],
        )
    return None


def locate(model_type: str, config_kwargs: Mapping[str, Any] | None = None) -> Site:
    """Build a tiny config (``config_kwargs``, else the generic shrink with 1, 2, 4 layers) and a meta
    model; the first MoE block's site. ``EntryError`` with the last attempts when there is none."""
    from transformers import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[model_type]
    given = config_kwargs is not None
    attempts = [dict(config_kwargs)] if given else [shrink_kwargs(config_cls, n) for n in LAYER_COUNTS]  # type: ignore[arg-type]
    log: list[str] = []
    for kwargs in attempts:
        for _retry in range(CONFIG_RETRIES):
            try:
                config = config_cls(**kwargs)
            except Exception as exc:  # noqa: BLE001 — drop a keyword the error names (generic kwargs only), retry
                log.append(f"config {config_cls.__name__}: {brief(exc)}")
                offending = [k for k in nested_keys(kwargs) if re.search(rf"\b{re.escape(k)}\b", str(exc))]
                if not given and offending and drop_key(kwargs, offending[0]):
                    continue
                break
            site = _site_in(model_type, config_cls, config, kwargs, log)
            if site is not None:
                return site
            break
    raise EntryError(f"{model_type}: no MoE block found in a tiny model; attempts: " + " | ".join(log[-LOG_TAIL:]))
