"""Building a transformers MoE block from a registry entry, loading canonical parameters into it,
and observing it (router output, experts call, gradients). Shared by every HF-based backend.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
from torch import nn

from moeconf.params import NOT_TRAINED, Params, param_shapes
from moeconf.registry.entry import ArchEntry
from moeconf.registry.layouts import LAYOUTS, split_to_canonical
from moeconf.spec import MoESpec


class EntryError(ValueError):
    """The registry entry does not fit the installed transformers (a configuration error)."""


def build_config(entry: ArchEntry) -> Any:
    """The entry's tiny config (the full one; see ``block_config``)."""
    config_cls = _config_class(entry)
    # NOTE: a deep copy: some config classes write into the dicts they are given (Mistral4Config adds
    # partial_rotary_factor to rope_parameters), which would leak into entries sharing that dict.
    return config_cls(**copy.deepcopy(entry.config_kwargs))


def _config_class(entry: ArchEntry) -> type:
    """The entry's config class: exported by ``transformers``, else defined in the model's own
    ``configuration_*`` module (the sibling of ``modeling_module``).

    NOTE: sub-configs are not always exported: before 5.6 ``Qwen3OmniMoeTextConfig`` and
    ``Qwen3OmniMoeTalkerTextConfig`` are only in configuration_qwen3_omni_moe.py (5.5.4 ``__all__``
    lists three of its classes), yet the models build them; the class is the same either way.
    """
    import transformers

    config_cls = getattr(transformers, entry.config_class, None)
    if config_cls is None:
        package, _, module = entry.modeling_module.rpartition(".")
        try:
            configuration = importlib.import_module(f"{package}.{module.replace('modeling_', 'configuration_', 1)}")
        except ImportError:
            configuration = None
        config_cls = getattr(configuration, entry.config_class, None)
    if config_cls is None:
        raise EntryError(f"{entry.model_type}: transformers has no config class {entry.config_class}")
    return config_cls


def block_config(entry: ArchEntry, config: Any) -> Any:
    """The (sub-)config the block is built from; ``block_config_attr`` may be dotted."""
    for attr in (entry.block_config_attr or "").split("."):
        config = getattr(config, attr) if attr else config
    return config


@cache
def block_class(entry: ArchEntry) -> type[nn.Module]:
    module = importlib.import_module(entry.modeling_module)
    try:
        return getattr(module, entry.block_class)
    except AttributeError:
        raise EntryError(f"{entry.model_type}: {entry.modeling_module} has no class {entry.block_class}") from None


def build_block(entry: ArchEntry, experts_implementation: str | None = None) -> nn.Module:
    """A fresh block on CPU in float32, with the given transformers experts implementation."""
    config = block_config(entry, build_config(entry))
    if experts_implementation is not None:
        # NOTE: the experts decorator looks this up at every call, so it also switches a live block.
        config._experts_implementation = experts_implementation
    cls = block_class(entry)
    if entry.block_init == "config_and_layer_idx":
        return adapt_block(entry, cls(config, layer_idx=0))
    if isinstance(entry.block_init, tuple):  # e.g. NllbMoeSparseMLP(config, ffn_dim=config.encoder_ffn_dim)
        return adapt_block(entry, cls(config, **{keyword: getattr(config, attr) for keyword, attr in entry.block_init}))
    return adapt_block(entry, cls(config))


def adapt_block(entry: ArchEntry, module: nn.Module) -> nn.Module:
    """``module`` itself, or the entry's ``block_adapter`` wrapped around it (Gemma 4's decoder layer →
    its MoE branch); the adapter shares the module's submodules, so a patch of either reaches both."""
    if entry.block_adapter is None:
        return module
    module_name, _, attr = entry.block_adapter.partition(":")
    try:
        adapter = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        raise EntryError(f"{entry.model_type}: no block adapter {entry.block_adapter!r}") from None
    return adapter(module)


def build_model_block(
    entry: ArchEntry,
    experts_implementation: str | None,
    model_patch: Callable[[nn.Module, ArchEntry], nn.Module | None],
) -> nn.Module:
    """The block as a framework's *model-level* patch leaves it, on CPU in float32.

    Frameworks choose their patch from the model (``config.architectures``, the class of the model or
    of its layers) and apply it to the model: so the patch gets a tiny full ``entry.model_class``
    (seeded, ``config.architectures`` set as a checkpoint's config has it), and the block is what sits
    at ``entry.block_path`` afterwards (a patch may replace it). The caller loads the parameters.
    """
    import transformers

    config = build_config(entry)
    config.architectures = [entry.model_class]
    if experts_implementation is not None:
        block_config(entry, config)._experts_implementation = experts_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, entry.model_class)(config)
    model = model_patch(model, entry) or model
    try:
        module = model.get_submodule(entry.block_path)
    except AttributeError:
        raise EntryError(
            f"{entry.model_type}: after the model patch there is no module at {entry.block_path}"
        ) from None
    return adapt_block(entry, module)


@cache
def _fp32_patterns(modeling_module: str) -> tuple[str, ...]:
    """``_keep_in_fp32_modules_strict`` of every model class in the block's modeling module."""
    module = importlib.import_module(modeling_module)
    patterns: set[str] = set()
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, nn.Module):
            patterns.update(getattr(value, "_keep_in_fp32_modules_strict", None) or ())
    return tuple(sorted(patterns))


def cast_like_from_pretrained(entry: ArchEntry, block: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``block.to(dtype)``, except what the model keeps in fp32 when loaded in bf16/fp16.

    NOTE: a model loaded with ``from_pretrained(dtype=bf16)`` keeps ``_keep_in_fp32_modules_strict``
    tensors (router weights, selection biases, ...) in fp32, and some routers rely on it (Inkling2
    multiplies fp32 inputs by its router weight); testing the block as it runs in training means
    casting it the same way.
    """
    block = block.to(dtype)
    if dtype not in (torch.bfloat16, torch.float16):
        return block
    rules = [
        re.compile(r"(^|\.)" + re.escape(p).replace(r"\*", ".*") + r"($|\.)")
        for p in _fp32_patterns(entry.modeling_module)
    ]
    for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
        if any(rule.search(f"{entry.block_path}.{name}") for rule in rules):
            tensor.data = tensor.data.float()
    return block


def _tensor_at(block: nn.Module, path: str) -> torch.Tensor:
    owner_path, _, attr = path.rpartition(".")
    owner = block.get_submodule(owner_path) if owner_path else block
    tensor = getattr(owner, attr, None)
    if not isinstance(tensor, torch.Tensor):
        raise EntryError(f"{type(block).__name__} has no parameter or buffer {path!r}")
    return tensor


def load_params(entry: ArchEntry, block: nn.Module, params: Params) -> None:
    """Write canonical ``params`` into the block through the entry's bindings.

    Every trainable block parameter must be bound: an unbound one would keep its random init and
    silently escape every comparison.
    """
    bound = {b.path for b in entry.params}
    unbound = [name for name, p in block.named_parameters() if p.requires_grad and name not in bound]
    if unbound:
        raise EntryError(f"{entry.model_type}: block parameters not bound to the reference: {', '.join(unbound)}")
    missing = set(param_shapes(entry.spec)) - {c for b in entry.params for c in b.canonical}
    sliced = {
        c: {b.expert for b in entry.params if c in b.canonical}
        for b in entry.params
        if b.expert is not None
        for c in b.canonical
    }
    missing |= {c for c, experts in sliced.items() if experts != set(range(entry.spec.num_experts))}
    if missing:
        raise EntryError(
            f"{entry.model_type}: canonical parameters with no (complete) binding: {', '.join(sorted(missing))}"
        )
    with torch.no_grad():
        for binding in entry.params:
            target = _tensor_at(block, binding.path)
            value = LAYOUTS[binding.layout].to_block(
                *(_canonical(params[name], binding.expert) for name in binding.canonical)
            )
            # NOTE: shapes must match exactly (no reshape): with H ≠ I a wrong layout cannot slip through.
            if value.shape != target.shape:
                raise EntryError(
                    f"{entry.model_type}: binding {binding.path} ({binding.layout}) builds {tuple(value.shape)}, "
                    f"block has {tuple(target.shape)}"
                )
            target.copy_(value.to(target.dtype))


def _canonical(value: torch.Tensor, expert: int | None) -> torch.Tensor:
    return value if expert is None else value[expert]


def to_canonical(
    entry: ArchEntry, tensors: Mapping[str, torch.Tensor | None]
) -> tuple[dict[str, torch.Tensor | None], tuple[str, ...]]:
    """Block tensors (weights or their grads, by binding path) split back into canonical names.

    Returns the canonical tensors and the per-expert slices that were None. A whole tensor that is
    None maps to None; a None per-expert slice becomes zeros in the assembled canonical tensor (and
    is named in the second value). Paths absent from ``tensors`` (buffers, frozen params) are skipped.
    """
    shapes = param_shapes(entry.spec)
    out: dict[str, torch.Tensor | None] = {}
    missing: list[str] = []
    for binding in entry.params:
        if binding.path not in tensors:
            continue
        value = tensors[binding.path]
        layout = LAYOUTS[binding.layout]
        if binding.expert is None:
            if value is None:
                out.update({name: None for name in binding.canonical})
            else:
                out.update(
                    zip(
                        binding.canonical,
                        split_to_canonical(layout, value, tuple(shapes[n] for n in binding.canonical)),
                    )
                )
            continue
        for name in binding.canonical:
            if out.get(name) is None:
                ref = value if value is not None else torch.zeros(())
                out[name] = torch.zeros(shapes[name], dtype=ref.dtype, device=ref.device)
        if value is None:
            missing += [f"{name}[{binding.expert}]" for name in binding.canonical]
            continue
        slices = split_to_canonical(layout, value, tuple(shapes[n][1:] for n in binding.canonical))
        for name, part in zip(binding.canonical, slices):
            out[name][binding.expert] = part.to(out[name].dtype)  # type: ignore[index]
    return out, tuple(missing)


def trained_tensors(entry: ArchEntry, block: nn.Module) -> dict[str, nn.Parameter]:
    """The block's trainable parameters that the entry binds, by binding path."""
    params = dict(block.named_parameters())
    return {b.path: params[b.path] for b in entry.params if b.path in params and params[b.path].requires_grad}


def canonical_grads(entry: ArchEntry, block: nn.Module) -> tuple[dict[str, torch.Tensor | None], tuple[str, ...]]:
    """The block's ``.grad``s under canonical names (see ``to_canonical``)."""
    return to_canonical(entry, {path: p.grad for path, p in trained_tensors(entry, block).items()})


@dataclass
class Recording:
    """What the hooks saw during one forward.

    Attributes:
        router_output: the router submodule's output (``entry.router_path``), for the routing.
        experts_args, experts_kwargs: the experts call's arguments, for the routing.
        recorded_logits: what the *model's* output recorder collected under ``router_logits`` for
            this block (``_can_record_outputs`` → ``MoeModelOutputWithPast.router_logits``): one
            tensor per router call it matched. None where the architecture has no aux/z loss or
            the installed transformers has no recorder to reuse (4.x): the router's own output
            stands in.
        sets: for a block with token sets (``entry.token_set_modules``), what each set's router and
            experts saw (each a ``Recording`` of its own hooks); empty otherwise.
        token_sets: ``[N]`` the token set of each token, for reassembling ``sets`` in token order.
    """

    router_output: Any = None
    experts_args: tuple[Any, ...] = ()
    experts_kwargs: dict[str, Any] = field(default_factory=dict)
    recorded_logits: list[torch.Tensor] | None = None
    sets: list[Recording] = field(default_factory=list)
    token_sets: torch.Tensor | None = None

    def router_logits(self, entry: ArchEntry) -> torch.Tensor | None:
        """The router logits as the model records them (the single recorded tensor); None if
        nothing, or more than one tensor, was recorded (``recorded_count`` says which)."""
        if self.recorded_logits is not None:
            logits = self.recorded_logits[0] if len(self.recorded_logits) == 1 else None
        else:
            logits = self.hooked_router_logits(entry)
        # NOTE: a router run on [B, S, H] (Switch) records [B, S, E]; the observation is per token row.
        return None if logits is None else logits.reshape(-1, logits.shape[-1])

    def hooked_router_logits(self, entry: ArchEntry) -> torch.Tensor | None:
        """The logits in the router submodule's output (where the registry says they sit)."""
        if self.sets:
            return self._by_set([(rec.hooked_router_logits(entry),) for rec in self.sets])[0]
        out = self.router_output
        if out is None or entry.routing_from == "router_index_weights":
            return None
        # NOTE: a router that returns the bare logits tensor (DeepSeek-V3 family up to transformers 5.6)
        # has no tuple to index: indexing it would read a row, not the logits.
        if entry.router_logits_index is None or isinstance(out, torch.Tensor):
            return out
        return out[entry.router_logits_index]

    @property
    def recorded_count(self) -> int | None:
        """How many router-logit tensors the model's recorder collected (None: no recorder)."""
        return None if self.recorded_logits is None else len(self.recorded_logits)

    def routing(self, entry: ArchEntry) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(topk_index [N, k], topk_weights [N, k])`` as the block used them."""
        if self.sets:
            index, weights = self._by_set([rec.routing(entry) for rec in self.sets])
            return index, weights
        if entry.routing_from == "none":
            return None, None
        if entry.routing_from == "router_index_weights":
            return (None, None) if self.router_output is None else (self.router_output[0], self.router_output[1])
        if entry.routing_from == "router_grouped":
            return (None, None) if self.router_output is None else ungroup_routing(self.router_output, entry.spec.top_k)
        if entry.routing_from == "router_dispatch":
            return (None, None) if self.router_output is None else dispatch_routing(self.router_output, entry.spec)
        if entry.routing_from == "router_dense_scores":
            if self.router_output is None:
                return None, None
            scores = self.router_output[0]  # [N, E], zero outside the selected experts
            index = scores.float().topk(entry.spec.top_k, dim=-1).indices
            return index, scores.gather(1, index)
        args = list(self.experts_args) + list(self.experts_kwargs.values())
        if len(args) < 3:
            return None, None
        # NOTE: experts called per [B, S] position (AFMoE before 5.4: index and weights [B, S, k]) take
        # the same routing as [N, k] rows.
        index, weights = args[1], args[2]
        return index.reshape(-1, index.shape[-1]), weights.reshape(-1, weights.shape[-1])

    def _by_set(self, parts: Sequence[Sequence[torch.Tensor | None]]) -> list[torch.Tensor | None]:
        """Per-set tensors (``parts[s]``, rows = set ``s``'s tokens in token order, as the block
        gathers them) put back at their tokens' rows ``[N, ..]``; None where a set with tokens
        showed nothing, or another number of rows than it has tokens."""
        if self.token_sets is None:  # no type ids: the block ran set 0 on every token
            return list(parts[0])
        out: list[torch.Tensor | None] = []
        for j in range(len(parts[0])):
            whole: torch.Tensor | None = None
            for s, part in enumerate(parts):
                rows = (self.token_sets == s).nonzero().flatten()
                if rows.numel() == 0:
                    continue
                value = part[j]
                if value is None or value.reshape(-1, *value.shape[-1:]).shape[0] != rows.numel():
                    return [None] * len(parts[0])
                value = value.reshape(rows.numel(), -1)
                if whole is None:
                    whole = value.new_zeros(self.token_sets.numel(), value.shape[-1])
                # NOTE: out of place, so routing weights keep the graph of every set's router.
                whole = whole.index_put((rows.to(value.device),), value)
            out.append(whole)
        return out


def ungroup_routing(router_output: Sequence[Any], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [N, k], weights [N, k])`` from a router that returns its routing grouped by expert.

    JetMoE's ``JetMoeTopKGating`` returns ``(order [N·k], token [N·k], gates [N·k], counts, logits)``:
    permuted row ``r`` is flat slot ``order[r]`` (= token·k + slot) with gate ``gates[r]``, and the rows
    are grouped by ascending expert, ``counts[e]`` (a list of E ints) rows each. Scattering every row
    back to its slot recovers the top-k the block routed with (weights keep their graph).
    """
    order, _, gates, counts = router_output[:4]
    counts = torch.as_tensor(counts, device=order.device)
    expert = torch.repeat_interleave(torch.arange(counts.numel(), device=order.device), counts)
    index = torch.empty_like(order).scatter(0, order, expert).view(-1, top_k)
    weights = torch.empty_like(gates).scatter(0, order, gates).view(-1, top_k)
    return index, weights


def dispatch_routing(router_output: Sequence[Any], spec: MoESpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [N, k], weights [N, k])`` from a capacity router's ``(dispatch, weights, logits)`` output.

    ``dispatch [.., E]`` is nonzero where a (token, expert) pair is dispatched after the capacity drops;
    ``weights`` is per slot ``[.., 1]`` for a top-1 router (Switch: the top-1 probability, dropped tokens
    included) and dense ``[.., E]`` for a top-k router, k > 1 (NLLB: the combine weights, nonzero exactly
    on the kept pairs; its dispatch is the kept *first* choices only). A dropped slot appears in neither,
    so it is filled with the router's own next choice by its ``logits [.., E]``: the index is the kept
    experts first, then the best of the rest. A kept expert is thus reported as kept (a wrong one shows),
    and only the experts of dropped slots come from the logits.

    Weights: a dropped slot weighs 0, as ``reference.router.route`` reports it under
    ``Capacity.dropped="zero"`` (a dense combine tensor cannot show anything else: NLLB's pre-drop share
    of a dropped slot is multiplied by the mask inside the router); under ``"passthrough"`` a top-1
    router's weight of a dropped token is reported as is, since the block applies it.

    NOTE: whether ``weights`` is dense is decided by ``k``, not by its width: at ``k == E`` (NLLB with two
    experts) both forms are ``[.., E]``, and dense weights read as per-slot ones would be aligned with an
    index whose order (kept experts, tied) they do not share. A per-slot ``[.., k]`` tensor with ``k > 1``
    cannot be aligned either (the router's slot order is not in its output), so it is refused.
    """
    dispatch, weights, logits = router_output[:3]
    width, k = spec.num_experts, spec.top_k
    dense = k > 1
    if dense and weights.shape[-1] != width:
        raise ValueError(
            f"dispatch_routing: a top-{k} capacity router must return dense [.., {width}] combine weights, "
            f"got [.., {weights.shape[-1]}]"
        )
    kept = dispatch.reshape(-1, width) != 0
    if dense:
        kept = kept | (weights.reshape(-1, width) != 0)
    priority = logits.detach().reshape(-1, width).float().masked_fill(kept, float("inf"))
    index = priority.topk(k, dim=-1).indices
    if dense:
        return index, weights.reshape(-1, width).gather(1, index)
    weights = weights.reshape(-1, k)
    capacity = spec.router.capacity
    if capacity is not None and capacity.dropped == "passthrough":
        return index, weights
    return index, weights * kept.gather(1, index).to(weights.dtype)


def _output_capturing() -> Any:
    """transformers' output-capturing module (5.2+), ``transformers.utils.generic`` where the recorder
    lives inside ``check_model_inputs`` (5.0, 5.1: ``OutputRecorder`` and ``_CAN_RECORD_REGISTRY``, no
    hooks to install), or None where there is none to reuse (4.x)."""
    try:
        return importlib.import_module("transformers.utils.output_capturing")
    except ImportError:
        pass
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return None
    generic = importlib.import_module("transformers.utils.generic")
    return generic if hasattr(generic, "OutputRecorder") and hasattr(generic, "_CAN_RECORD_REGISTRY") else None


_RECORDERS: dict[tuple[str, str, str, str], tuple[tuple[Any, ...], str]] = {}


def router_logits_recorders(entry: ArchEntry) -> tuple[tuple[Any, ...], str] | None:
    """``(OutputRecorder specs, block name)`` with which the entry's model records ``router_logits``.

    The specs are the ``_can_record_outputs["router_logits"]`` of the innermost ``PreTrainedModel``
    that holds the block in a tiny ``entry.model_class`` model (a composite model's text model has
    its own), normalised as transformers normalises them; the name is the block's path inside that
    model, as the recorder's ``layer_name`` / ``class_name`` rules see it. None on transformers 4.x.

    NOTE: built on the meta device (no memory, no initialisation) once per model and tiny config
    (``moeconf discover`` makes many entries of one model): the recorder's target is a class and
    an index that only the model declares, not the block.
    """
    capturing = _output_capturing()
    if capturing is None:
        return None
    key = (entry.config_class, entry.model_class, entry.block_path, repr(entry.config_kwargs))
    if key not in _RECORDERS:
        _RECORDERS[key] = _find_recorders(entry, capturing)
    return _RECORDERS[key]


def _find_recorders(entry: ArchEntry, capturing: Any) -> tuple[tuple[Any, ...], str]:
    import transformers
    from transformers import PreTrainedModel

    try:
        model_cls = getattr(transformers, entry.model_class)
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = model_cls(build_config(entry))
        model.get_submodule(entry.block_path)
    except Exception as exc:  # whatever the model raises, the entry does not fit the installed transformers
        raise EntryError(
            f"{entry.model_type}: cannot build a tiny {entry.model_class} to find what it records as "
            f"router logits: {type(exc).__name__}: {exc}"
        ) from exc
    parts = entry.block_path.split(".")
    owner, owner_depth = model, 0
    for depth in range(1, len(parts)):
        module = model.get_submodule(".".join(parts[:depth]))
        if isinstance(module, PreTrainedModel):
            owner, owner_depth = module, depth
    specs = _can_record_outputs(capturing, owner).get("router_logits")
    if specs is None:
        specs = getattr(type(owner), "_can_record_outputs", None) or {}
        specs = specs.get("router_logits") if isinstance(specs, dict) else None
    if specs is None:
        return (), ""
    normalised = []
    for spec in specs if isinstance(specs, list) else [specs]:
        if not isinstance(spec, capturing.OutputRecorder):  # as install_all_output_capturing_hooks does
            spec = capturing.OutputRecorder(
                target_class=None if isinstance(spec, str) else spec,
                index=1,
                class_name=spec if isinstance(spec, str) else None,
            )
        normalised.append(spec)
    return tuple(normalised), "." + ".".join(parts[owner_depth:])


def _can_record_outputs(capturing: Any, owner: nn.Module) -> dict[str, Any]:
    """The ``_can_record_outputs`` transformers registered for ``owner``'s class, ``{}`` if none.

    NOTE: transformers < 5.23 keeps a plain dict keyed by ``str(cls)`` (5.6.2 modeling_utils.py:1324,
    ``_CAN_RECORD_REGISTRY[str(self.__class__)] = ...``); 5.23.0 wraps it in ``_CanRecordRegistry``,
    whose ``get`` takes the model itself. Both are read here rather than pinning one.
    """
    registry = capturing._CAN_RECORD_REGISTRY
    flags = registry.get(str(type(owner))) if type(registry) is dict else registry.get(owner)
    return flags or {}


def _install_model_recorder(entry: ArchEntry, block: nn.Module) -> bool:
    """Install the model's own ``router_logits`` capturing hooks on the block (once per block).

    NOTE: transformers' hooks (``recursively_install_hooks``) rather than a copy of their matching
    rules: whatever the model would collect for this block, and only that, is what the aux loss is
    computed from. The hooks stay (transformers' cannot be removed) but do nothing outside an
    active collector, exactly as in a model.
    """
    if getattr(block, "_moeconf_router_recorder", False):
        return True
    if entry.spec.losses.aux == "none" and not entry.spec.losses.z_loss:
        return False  # only the losses read the recording; no model to build for the rest
    recorders = router_logits_recorders(entry)
    if recorders is None:
        return False
    specs, name = recorders
    capturing = _output_capturing()
    if not hasattr(capturing, "recursively_install_hooks"):
        return True  # 5.0 / 5.1: ``recording`` hooks the matching modules for its own duration
    capturing.recursively_install_hooks(block, name, [("router_logits", spec) for spec in specs])
    setattr(block, "_moeconf_router_recorder", True)  # noqa: B010 - a marker on a module, not an attribute it defines
    return True


def _check_model_inputs_hooks(entry: ArchEntry, block: nn.Module, collected: list[torch.Tensor]) -> list[Any]:
    """Forward hooks collecting into ``collected`` what 5.0 / 5.1's ``check_model_inputs`` records as
    ``router_logits`` for this block.

    NOTE: there the recorder is a closure that wraps ``forward`` only during the model's own forward
    (5.0.0 utils/generic.py:950-993), so it cannot be installed on a bare block; its two rules are
    applied here to the model's own specs (``router_logits_recorders``): a module matches by class or
    by its full name ending in ``class_name`` (and containing ``layer_name``), and a tuple output is
    recorded at the spec's index unless that item is None, any other output whole.
    """
    specs, name = router_logits_recorders(entry) or ((), "")
    prefix = name.lstrip(".")
    handles = []
    for sub_name, module in block.named_modules():
        full = ".".join(part for part in (prefix, sub_name) if part)
        for spec in specs:
            matched = (spec.target_class is not None and isinstance(module, spec.target_class)) or (
                spec.class_name is not None and full.endswith(spec.class_name)
            )
            if matched and (spec.layer_name is None or spec.layer_name in full):
                handles.append(module.register_forward_hook(_collector(collected, spec.index)))
    return handles


def _collector(collected: list[torch.Tensor], index: int) -> Callable[..., None]:
    def collect(_module: nn.Module, _args: Any, output: Any) -> None:
        if not isinstance(output, tuple):
            collected.append(output)
        elif output[index] is not None:
            collected.append(output[index])

    return collect


def _hook_set(entry: ArchEntry, block: nn.Module, rec: Recording, token_set: int) -> list[Any]:
    """Hooks recording token set ``token_set``'s router output and experts call into ``rec``."""

    def on_router(_module: nn.Module, _args: Any, output: Any) -> None:
        rec.router_output = output

    def on_experts(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rec.experts_args, rec.experts_kwargs = args, kwargs

    router = block.get_submodule(entry.set_path(entry.router_path, token_set))
    handles = [router.register_forward_hook(on_router)]
    if entry.routing_from == "experts_call":
        experts = block.get_submodule(entry.set_path(entry.experts_path, token_set))
        handles.append(experts.register_forward_pre_hook(on_experts, with_kwargs=True))
    return handles


def token_sets_of_types(entry: ArchEntry, token_types: torch.Tensor | None, n: int) -> torch.Tensor:
    """``[N]`` token set of each token (``spec.token_sets.set_of_type``); all set 0 without type ids,
    as a block given none runs its set 0 on every token."""
    sets = entry.spec.token_sets
    if sets is None or token_types is None:
        return torch.zeros(n, dtype=torch.long)
    return torch.tensor(sets.set_of_type, dtype=torch.long)[token_types.reshape(-1).long().cpu()]


@contextmanager
def recording(entry: ArchEntry, block: nn.Module, token_types: torch.Tensor | None = None) -> Iterator[Recording]:
    """Hooks on the router (its output) and the experts (their call arguments), removed on exit;
    and the model's own ``router_logits`` recorder, collecting while the context is open. A block
    with token sets gets the hooks on every set's router and experts, and ``token_types [B, S]``
    places each set's rows."""
    rec = Recording()
    if entry.token_set_modules:
        rec.sets = [Recording() for _ in entry.token_set_modules]
        handles = [h for s, sub in enumerate(rec.sets) for h in _hook_set(entry, block, sub, s)]
        if token_types is not None:
            rec.token_sets = token_sets_of_types(entry, token_types, token_types.numel())
    else:
        handles = _hook_set(entry, block, rec, 0)
    capturing = _output_capturing() if _install_model_recorder(entry, block) else None
    token = None
    if capturing is not None:
        # The collector capture_outputs opens around a model's forward with output_router_logits.
        collected: dict[str, list[torch.Tensor]] = {"router_logits": []}
        if hasattr(capturing, "_active_collector"):
            token = capturing._active_collector.set(collected)
        else:
            handles += _check_model_inputs_hooks(entry, block, collected["router_logits"])
        rec.recorded_logits = collected["router_logits"]
    try:
        yield rec
    finally:
        if token is not None:
            capturing._active_collector.reset(token)
        for handle in handles:
            handle.remove()


def framework_loss_fn(entry: ArchEntry, name: str) -> Any:
    """A loss function of the block's own modeling module (e.g. ``load_balancing_loss_func``)."""
    fn = getattr(importlib.import_module(entry.modeling_module), name, None)
    if fn is None:
        raise EntryError(f"{entry.model_type}: {entry.modeling_module} defines no {name}")
    return fn


def framework_losses(
    entry: ArchEntry, recorded: Sequence[torch.Tensor], attention_mask: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(aux_loss, z_loss)`` as the model computes them from the router logits its recorder
    collected for the block (``recorded``: one tensor per recorded router call, normally one), with
    the modeling module's own ``load_balancing_loss_func`` / ``router_z_loss_func``; None where the
    architecture has no such loss or nothing was recorded. The losses keep their autograd graph
    (the model adds them to the training loss)."""
    spec = entry.spec
    if not recorded:
        return None, None
    aux = z = None
    if spec.losses.aux == "switch":
        aux_fn = framework_loss_fn(entry, "load_balancing_loss_func")
        if "router_probs" in inspect.signature(aux_fn).parameters:
            aux = _switch_aux_loss(aux_fn, recorded)
        else:
            mask = attention_mask.to(recorded[0].device)
            aux = aux_fn(tuple(recorded), spec.num_experts, spec.top_k, mask)
    if spec.losses.z_loss:
        z = framework_loss_fn(entry, "router_z_loss_func")(torch.cat(tuple(recorded)))
    return aux, z


def _switch_aux_loss(aux_fn: Callable[..., torch.Tensor], recorded: Sequence[torch.Tensor]) -> torch.Tensor:
    """Switch's ``load_balancing_loss_func(router_probs [B, S, E], expert_indices [B, S])``, fed as
    ``SwitchTransformersForConditionalGeneration.forward`` feeds it: the recorded ``[B, S, E]`` logits
    concatenated along the sequence, softmaxed, and their argmax as the indices
    (models/switch_transformers/modeling_switch_transformers.py:1047-1050, ``_unpack_router_logits`` at
    :1093-1097). No attention mask: that function takes none."""
    logits = torch.cat(tuple(recorded), dim=1)
    return aux_fn(torch.softmax(logits, dim=-1), logits.argmax(dim=-1))


def loss_gradients(
    entry: ArchEntry, block: nn.Module, hidden: torch.Tensor, losses: Mapping[str, torch.Tensor | None]
) -> dict[str, dict[str, torch.Tensor | None]]:
    """For each loss: its gradient w.r.t. the block input (``"input"``) and the router's trained
    parameters (canonical ``router.*`` names), by ``torch.autograd.grad`` on the loss's own graph.

    A loss without a graph (computed on detached logits, or a float re-wrapped as a tensor) gets
    None for every gradient: it cannot train the router. Call before the output's backward (the
    graph is retained for it); ``.grad`` is left untouched.
    """
    router = {
        path: p
        for path, p in trained_tensors(entry, block).items()
        if any(b.path == path and all(c.startswith("router.") for c in b.canonical) for b in entry.params)
    }
    out: dict[str, dict[str, torch.Tensor | None]] = {}
    for name, loss in losses.items():
        if loss is None:
            continue
        grads: tuple[torch.Tensor | None, ...] = (None,) * (1 + len(router))
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            grads = torch.autograd.grad(loss, [hidden, *router.values()], retain_graph=True, allow_unused=True)
        canonical, _ = to_canonical(entry, dict(zip(router, grads[1:])))
        out[name] = {
            "input": grads[0],
            **{k: v for k, v in canonical.items() if k.startswith("router.") and k not in NOT_TRAINED},
        }
    return out
