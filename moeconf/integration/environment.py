"""The conditions a framework's leaf function runs under in training, reproduced in one process.

* DeepSpeed's *default* leaf list is switched off, so the function is judged on what it marks itself.
* transformers' ``is_deepspeed_zero3_enabled()`` answers True (frameworks call their leaf function
  only under ZeRO-3, and guard it on exactly that).
* ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` and the RNG seeds are those of one rank of several.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch

DEFAULT_LEAF_LISTS = ("DEFAULT_LEAF_MODULE_CLASSES", "DEFAULT_LEAF_MODULE_NAMES", "DEFAULT_LEAF_MODULE_NAME_SUFFIXES")


@contextmanager
def deepspeed_default_leaves_off() -> Iterator[None]:
    """Empty DeepSpeed's default leaf lists for the duration.

    NOTE: DeepSpeed ≥ 0.18 marks the Mixtral, Qwen2-MoE and Qwen3-MoE blocks as ZeRO-3 leaves by
    default: ``DeepSpeedZeroLeafModuleConfig`` (``zero_optimization.leaf_module``) takes its
    ``classes`` from ``deepspeed.runtime.zero.leaf_module_config.DEFAULT_LEAF_MODULE_CLASSES``, and
    ``deepspeed.initialize`` applies it through ``apply_zero_leaf_module_config``. Both read the
    module-level lists when called, so emptying them here means a function that calls either (or
    ``deepspeed.initialize``) gets no leaf it did not ask for: exactly those three architectures
    would otherwise pass whatever the function does. Older DeepSpeed has no such lists: nothing to do.
    """
    try:
        from deepspeed.runtime.zero import leaf_module_config as lists
    except ImportError:
        yield
        return
    saved = {name: getattr(lists, name) for name in DEFAULT_LEAF_LISTS if hasattr(lists, name)}
    try:
        for name in saved:
            setattr(lists, name, [])
        yield
    finally:
        for name, value in saved.items():
            setattr(lists, name, value)


class _Zero3Config:
    """The part of ``transformers.integrations.HfDeepSpeedConfig`` that frameworks query."""

    config: ClassVar[dict[str, Any]] = {"zero_optimization": {"stage": 3}}

    def is_zero3(self) -> bool:
        return True

    def is_zero2(self) -> bool:
        return False

    def is_offload(self) -> bool:
        return False

    def get_value(self, key: str, default: Any = None) -> Any:
        value: Any = self.config
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                return default
            value = value[part]
        return value


@contextmanager
def zero3_enabled() -> Iterator[None]:
    """``transformers.integrations.is_deepspeed_zero3_enabled()`` is True for the duration.

    NOTE: transformers keeps a weak reference to the active DeepSpeed config (set by
    ``HfDeepSpeedConfig`` / the Trainer); pointing it at a stub that says "stage 3" is what a guarded
    leaf function (``if not is_deepspeed_zero3_enabled(): return``) sees in training. Enter it only
    around the call, never around model construction: transformers would then build under
    ``deepspeed.zero.Init``.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    stub = _Zero3Config()  # the weak reference needs a live object until we restore
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.set_hf_deepspeed_config(stub)
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


@contextmanager
def as_rank(rank: int, world_size: int) -> Iterator[None]:
    """Environment and RNG of rank ``rank`` of ``world_size`` (one node) for the duration.

    The RNG seeds differ per rank, as they do when each rank seeds from its rank; the caller's RNG
    state and environment come back afterwards.
    """
    values = dict(zip(RANK_VARIABLES, (str(rank), str(rank), str(world_size), str(world_size))))
    saved_env = {k: os.environ.get(k) for k in RANK_VARIABLES}
    with preserved_rng():
        os.environ.update(values)
        torch.manual_seed(1000 + rank)
        random.seed(1000 + rank)
        try:
            yield
        finally:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@contextmanager
def preserved_rng() -> Iterator[None]:
    """The caller's torch (CPU) and ``random`` RNG states come back afterwards: the audits seed model
    construction, and auditing must not change what the caller's training run draws next."""
    state = torch.get_rng_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(state[0])
        random.setstate(state[1])


__all__ = ["as_rank", "deepspeed_default_leaves_off", "preserved_rng", "zero3_enabled"]
