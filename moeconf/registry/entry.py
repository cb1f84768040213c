"""The registry's record type: one declarative ``ArchEntry`` per HF ``model_type``.

An entry is data: how to build a tiny config, which class is the MoE block and where it sits in a
model, the ZeRO-3 leaf class names, the aux-loss coefficient attribute, the spec for the reference,
and how the block's tensors map onto canonical parameters. Skips and expected failures are declared
next to the entry they concern (PyTorch OpInfo style).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from moeconf.spec import MoESpec


@dataclass(frozen=True)
class Binding:
    """One block tensor (parameter or buffer) ↔ canonical parameter(s).

    Attributes:
        path: dotted path relative to the block, e.g. ``"experts.gate_up_proj"``.
        canonical: canonical names in the order the layout takes them, e.g. ``("experts.w_gate", "experts.w_up")``.
        layout: a name from ``moeconf.registry.layouts.LAYOUTS``.
        expert: when set, the block tensor holds only this expert's slice ``canonical[expert]``
            (per-expert ``ModuleList``/``ModuleDict`` experts: transformers 4.x, Switch, NLLB).
    """

    path: str
    canonical: tuple[str, ...]
    layout: str = "identity"
    expert: int | None = None


@dataclass(frozen=True)
class Expectation:
    """A declared deviation: the named check is expected to fail (``xfail``) or cannot run (``skip``).

    ``None`` fields match everything. ``reason`` must name the upstream behaviour.
    """

    status: Literal["xfail", "skip"]
    reason: str
    check: str | None = None
    backend: str | None = None
    dtype: str | None = None
    device: str | None = None

    def matches(self, check: str, backend: str, dtype: str, device: str) -> bool:
        return all(
            want is None or want == got
            for want, got in ((self.check, check), (self.backend, backend), (self.dtype, dtype), (self.device, device))
        )


@dataclass(frozen=True, eq=False)  # identity hash: entries key caches
class ArchEntry:
    """Everything moeconf needs to test one HF model type.

    Attributes:
        model_type: the HF ``model_type``.
        config_class: name of the config class exported by ``transformers``.
        config_kwargs: a tiny config (no hub access); sizes agree with ``spec``.
        modeling_module: module that defines the block, e.g. ``transformers.models.mixtral.modeling_mixtral``.
        block_class: the MoE block class (also the default ZeRO-3 leaf).
        block_path: where the first MoE block sits in a tiny ``model_class`` model.
        model_class: the model class (exported by ``transformers``) used for whole-model audits.
        leaf_classes: class names to pass to ``deepspeed.utils.set_z3_leaf_modules``.
        aux_coef_attr: config attribute holding the aux-loss coefficient (dotted for sub-configs);
            None when the model computes no aux loss.
        spec: what the block must compute.
        params: bindings covering every canonical parameter of ``spec``.
        router_path: module (relative to the block) whose output the framework records as router logits.
        router_logits_index: index of the logits in that module's output tuple (None: output is the tensor).
        experts_path: experts module, called as ``experts(hidden [N, H], index [N, k], weights [N, k])``.
        routing_from: where a backend reads the routing: the experts call's arguments, the router's
            dense ``[N, E]`` score matrix (Llama-4, whose experts see pre-weighted inputs), the router's
            ``(index, weights)`` output (DeepSeek-V3 in transformers 4.x), or nowhere (``"none"``: the
            routing checks are skipped).
        block_init: constructor arguments of the block class.
        block_config_attr: sub-config the block is built from (``"text_config"`` for composite models).
        train_mode: run the block in ``train()`` (default, as training stacks do) or ``eval()`` (blocks
            whose training forward is stochastic: jitter, Gumbel sampling).
        experts_implementations: transformers experts implementations the experts class accepts.
        expectations: declared xfails/skips, each with the upstream reason.
    """

    model_type: str
    config_class: str
    config_kwargs: dict[str, Any]
    modeling_module: str
    block_class: str
    block_path: str
    model_class: str
    spec: MoESpec
    params: tuple[Binding, ...]
    router_path: str
    experts_path: str
    router_logits_index: int | None = 0
    routing_from: Literal["experts_call", "router_dense_scores", "router_index_weights", "none"] = "experts_call"
    leaf_classes: tuple[str, ...] = ()
    aux_coef_attr: str | None = None
    block_init: Literal["config", "config_and_layer_idx"] = "config"
    block_config_attr: str | None = None
    train_mode: bool = True
    experts_implementations: tuple[str, ...] = ("eager", "grouped_mm", "batched_mm")
    expectations: tuple[Expectation, ...] = field(default=())

    @property
    def zero3_leaves(self) -> tuple[str, ...]:
        return self.leaf_classes or (self.block_class,)

    def expectation(self, check: str, backend: str, dtype: str, device: str) -> Expectation | None:
        """The first declared deviation for this (check, backend, dtype, device), if any."""
        return next((x for x in self.expectations if x.matches(check, backend, dtype, device)), None)


def sub_config_variant(
    entry: ArchEntry, *, model_type: str, config_class: str, block_path: str, model_class: str, **overrides: Any
) -> ArchEntry:
    """The same block registered under the model type of its sub-config (``qwen3_vl_moe`` →
    ``qwen3_vl_moe_text``): the tiny config is the composite's ``block_config_attr`` part.

    ``overrides`` replace any other field (e.g. ``aux_coef_attr=None`` when the text model has no loss).
    """
    import dataclasses

    if entry.block_config_attr is None or "." in entry.block_config_attr:
        raise ValueError(f"{entry.model_type}: only a composite entry with a one-level block_config_attr has variants")
    return dataclasses.replace(
        entry,
        model_type=model_type,
        config_class=config_class,
        block_path=block_path,
        model_class=model_class,
        config_kwargs=dict(entry.config_kwargs[entry.block_config_attr]),
        block_config_attr=None,
        **overrides,
    )
