"""The registry's record type: one declarative ``ArchEntry`` per HF ``model_type``.

An entry is data: how to build a tiny config, which class is the MoE block and where it sits in a
model, the ZeRO-3 leaf class names, the aux-loss coefficient attribute, the spec for the reference,
and how the block's tensors map onto canonical parameters. Skips and expected failures are declared
next to the entry they concern (PyTorch OpInfo style).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from moeconf.registry.config_space import TINY, ConfigSample, FieldRule, Published
from moeconf.registry.versions import in_releases, release_range
from moeconf.spec import MoESpec

CHECK_NAMES: frozenset[str] = frozenset(
    {
        # the parity checks (moeconf.harness.checks.CHECKS)
        "routing",
        "routing_weights",
        "output",
        "aux_loss",
        "z_loss",
        "grad_input",
        "grad_router",
        "grad_experts",
        "grad_shared_experts",
        "grad_aux_loss",
        "grad_z_loss",
        # the partition checks (moeconf.harness.partition_checks.PARTITION_CHECKS)
        "no_hang",
        "partition_output",
        "partition_losses",
        "partition_grads",
        "partition_zero_grads",
        "partition_params",
        # the configuration audit (moeconf.tools.audit)
        "config_leaf",
        "config_aux_loss",
        "config_rejects_invalid",
    }
)
"""Every check a declaration may name. The registry sits below the harness, so the names are listed here
and tests/test_config_space.py holds them equal to the harness's own tables."""


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

    ``None`` fields match everything. ``reason`` must name the upstream behaviour. ``releases`` limits
    it to the transformers releases in a PEP 440 range (``"<5.13"``): on the releases where upstream
    fixed the bug the check is judged as usual, so a regression there is a plain ``fail``. ``case``
    limits it to one input case (``moeconf.harness.cases``), for a bug only that batch shape reaches.
    """

    status: Literal["xfail", "skip"]
    reason: str
    check: str | None = None
    backend: str | None = None
    dtype: str | None = None
    device: str | None = None
    releases: str | None = None
    case: str | None = None
    config: str | None = None
    """The config sample it is limited to, by name (``"invalid:kept"``) or kind (``"published"``); None: every
    sample."""
    when: tuple[tuple[str, Any], ...] = ()
    """Block-config values under which it holds (``(("norm_topk_prob", True),)``): a bug that only a config
    with those values reaches. ``moeconf.hf.configs.at_config`` keeps it for the samples that have them."""

    def __post_init__(self) -> None:
        if self.releases is not None:
            release_range(self.releases)  # raises on a malformed or empty range, at import time
        if self.check is not None and self.check not in CHECK_NAMES:
            raise ValueError(
                f"Expectation names an unknown check {self.check!r}; checks: {', '.join(sorted(CHECK_NAMES))}"
            )

    def matches(self, check: str, backend: str, dtype: str, device: str, case: str | None = None) -> bool:
        """Whether it applies; a case-limited declaration applies only where the case is known."""
        return in_releases(self.releases) and all(
            want is None or want == got
            for want, got in (
                (self.check, check),
                (self.backend, backend),
                (self.dtype, dtype),
                (self.device, device),
                (self.case, case),
            )
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
        experts_path: experts module, called as ``experts(hidden [N, H], index [N, k], weights [N, k])``;
            ``""`` where the block holds the expert weights itself (JetMoE), so no backend can patch them.
        routing_from: where a backend reads the routing: the experts call's arguments, the router's
            dense ``[N, E]`` score matrix (Llama-4, whose experts see pre-weighted inputs), the router's
            ``(index, weights)`` output (DeepSeek-V3 in transformers 4.x), the router's expert-grouped
            ``(order, token, gates, counts, logits)`` output (``"router_grouped"``: JetMoE, whose experts
            are called on sorted rows, ``moeconf.hf.block.ungroup_routing``), the capacity router's
            ``(dispatch, weights, logits)`` output (``"router_dispatch"``: Switch / NLLB, whose experts get
            a dispatch mask, ``moeconf.hf.block.dispatch_routing``), or nowhere (``"none"``: the
            routing checks are skipped).
        block_init: constructor arguments of the block class: the config, the config and
            ``layer_idx=0``, or the config and keyword arguments read from it, as
            ``((keyword, config attribute), ...)`` (NLLB's ``ffn_dim=config.encoder_ffn_dim``).
        block_config_attr: sub-config the block is built from (``"text_config"`` for composite models).
        train_mode: run the block in ``train()`` (default, as training stacks do) or ``eval()`` (blocks
            whose training forward is stochastic: jitter, Gumbel sampling).
        experts_implementations: transformers experts implementations the experts class accepts.
        expectations: declared xfails/skips, each with the upstream reason.
        token_types_kwarg: the block forward's keyword that takes the ``[B, S]`` token-type ids
            choosing each token's expert set (``spec.token_sets``; ERNIE-4.5-VL's
            ``moe_mm_token_type_ids``); None for blocks without token sets.
        token_set_modules: the module (relative to the block) holding each token set's router and
            experts, set 0 first (``("text_moe", "vision_moe")``); ``router_path`` and ``experts_path``
            name set 0's, and set ``s``'s are the same paths under ``token_set_modules[s]``
            (``set_path``). Empty for blocks without token sets.
    """

    model_type: str
    config_class: str
    config_kwargs: dict[str, Any]
    block_class: str
    block_path: str
    model_class: str
    spec: MoESpec
    params: tuple[Binding, ...]
    router_path: str
    experts_path: str
    modeling_module: str = ""
    """Derived from ``model_type`` when empty (``transformers.models.<type>.modeling_<type>``, ``-`` → ``_``);
    set only for a block that lives in another model's module."""
    router_logits_index: int | None = 0
    routing_from: Literal[
        "experts_call", "router_dense_scores", "router_index_weights", "router_grouped", "router_dispatch", "none"
    ] = "experts_call"
    leaf_classes: tuple[str, ...] = ()
    aux_coef_attr: str | None = None
    block_init: Literal["config", "config_and_layer_idx"] | tuple[tuple[str, str], ...] = "config"
    block_config_attr: str | None = None
    train_mode: bool = True
    experts_implementations: tuple[str, ...] = ("eager", "grouped_mm", "batched_mm")
    expectations: tuple[Expectation, ...] = field(default=())
    token_types_kwarg: str | None = None
    token_set_modules: tuple[str, ...] = ()
    block_adapter: str | None = None
    """``"package.module:Class"`` of an adapter that makes the MoE block out of a module which is not one
    (Gemma 4: router and experts are children of the decoder layer, ``block_class``). ``Class(module)`` wraps
    the module built as ``block_init`` says (or found at ``block_path``) and shares its submodules, so the
    bindings, ``router_path`` and ``experts_path`` are relative to the adapter. None: the module is the block."""
    config_fields: tuple[FieldRule, ...] = ()
    """The block config's fields that set the spec beyond ``config_space.COMMON_FIELDS`` (other names, dotted
    sub-config fields), or common names it does not read that way (``FieldRule(name, None, why)``);
    ``spec`` is then the form the config fills in (``config_space.derive_spec``)."""
    published: tuple[Published, ...] = ()
    """Released checkpoints' routing values, each a ``published:<name>`` config sample."""
    sample: ConfigSample = TINY
    """The config sample this entry is at: ``tiny`` as registered; ``moeconf.hf.configs.at_config`` makes
    the others (records and repro lines name it)."""

    def __post_init__(self) -> None:
        if not self.modeling_module:
            folder = self.model_type.replace("-", "_")
            object.__setattr__(self, "modeling_module", f"transformers.models.{folder}.modeling_{folder}")

    @property
    def zero3_leaves(self) -> tuple[str, ...]:
        return self.leaf_classes or (self.block_class,)

    @property
    def num_token_sets(self) -> int:
        """Expert sets the block holds (1 without token sets)."""
        return max(1, len(self.token_set_modules))

    def set_path(self, path: str, token_set: int) -> str:
        """``path`` (set 0's ``router_path`` / ``experts_path``) in token set ``token_set``'s module."""
        if token_set == 0:
            return path
        first = self.token_set_modules[0]
        if not path.startswith(first + "."):
            raise ValueError(f"{self.model_type}: {path!r} is not under token set 0's module {first!r}")
        return self.token_set_modules[token_set] + path[len(first) :]

    def expectation(
        self, check: str, backend: str, dtype: str, device: str, case: str | None = None
    ) -> Expectation | None:
        """The first declared deviation for this (check, backend, dtype, device[, case]), if any."""
        return next((x for x in self.expectations if x.matches(check, backend, dtype, device, case)), None)


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
