"""Coverage guard: which MoE model types does the *installed* transformers ship, and are they all registered?

Discovery reads source text only (no modeling module is imported): every
``transformers/models/*/modeling_*.py`` is scanned for evidence of a token-level MoE, the evidence is
scored, and modeling folders are mapped to model types through ``CONFIG_MAPPING_NAMES`` (one folder
serves several types: ``*_text`` sub-configs, aliases such as ``step3p5``) plus the auto model mapping
(types whose model class lives in another MoE folder: ``sarvam_mla`` → ``DeepseekV3Model``).

A model type is then either registered (``moeconf.registry.REGISTRY``), declared unsupported here
(``DECLARED_UNSUPPORTED``, one-line reason each), or *uncovered* — which the coverage guard test
reports by name.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# --- evidence ---------------------------------------------------------------------------------------

DECORATOR = "@use_experts_implementation"
"""transformers' experts-implementation decorator: only ever put on a routed-experts module."""

LOSS_FUNCTION = re.compile(r"^def (load_balancing_loss_func|router_z_loss_func)\b", re.MULTILINE)
"""A Switch/GShard load-balancing (or router z-) loss defined in the module."""

CLASS = re.compile(r"^class (\w+)\(", re.MULTILINE)

CLASS_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # Checked in this order: ``VitPoseNaiveMoe`` is an experts container, not a block.
    ("experts", re.compile(r"(Experts?|ExpertGLU|NaiveMoe)$")),
    ("router", re.compile(r"(Top[kK]Router|Top[12]Router|Router|TopKGating)$")),
    ("block", re.compile(r"(SparseMo[eE]Block|SparseMLP|Mo[eE]|Mo[eE]Block|Mo[eE]Layer|MoeMLP)$")),
)
"""Class-name suffixes of the three parts of an MoE layer. One kind alone is not enough
(``GraniteDoclingDensityRouter`` is a router without experts); two different kinds are."""

KNOWN_FALSE_POSITIVES: dict[str, str] = {
    "big_bird": "BigBirdBlockSparseAttention: block-sparse attention, no experts",
    "bigbird_pegasus": "BigBirdPegasusBlockSparseAttention: block-sparse attention, no experts",
    "informer": "InformerProbSparseAttention: ProbSparse attention, no experts",
    "mra": "MraSparseDenseMatMul: sparse attention kernel, no experts",
    "moshi": "MoshiGatingMLP: a gated dense MLP, no routing",
    "kyutai_speech_to_text": "KyutaiSpeechToTextGatingMLP: a gated dense MLP (Moshi's), no routing",
    "granite_docling": "GraniteDoclingDensityRouter picks a vision connector per image, not experts per token",
}
"""Modeling folders whose class names look like MoE but that route no tokens to experts
(docs/transformers-moe-landscape.md, 'Declared unsupported types'). Applied after the evidence rule, as a safety net
should a future version add more MoE-looking names to them."""

EXPERT_FIELD = re.compile(r"expert", re.IGNORECASE)
"""Config fields that make a (sub-)config an MoE config: ``num_experts``, ``n_routed_experts``,
``num_experts_per_tok``, ``moe_num_experts``, ``top_k_experts`` ..."""

# --- declared gaps ------------------------------------------------------------------------------------

DECLARED_UNSUPPORTED: dict[str, str] = {
    # Each reason verified against transformers 5.24 and the spec (moeconf/spec.py); the source line of each is in
    # docs/transformers-moe-landscape.md, 'Declared unsupported types'.
    "doge": "product-key retrieval experts (nn.Embedding up/down, two top-√E key lists): no routed-expert MLP to compare",
    "vitpose_backbone": "experts selected by a dataset index, no router: nothing token-routed to check",
    "zaya": "router is an MLP with a state carried from the previous layer, E+1 classes with a skip class, top-1 only; block returns (out, state)",
}
"""MoE model types that are deliberately not registered, each with its reason (one line)."""


@dataclass(frozen=True)
class ModuleEvidence:
    """Why one modeling file looks like a token-level MoE.

    Attributes:
        folder: the ``transformers/models`` folder (e.g. ``"mixtral"``).
        file: the modeling file name.
        decorated: carries ``@use_experts_implementation``.
        loss_functions: load-balancing / z-loss functions it defines.
        classes: MoE-looking class names by kind (``experts``/``router``/``block``).
        defined: every class the file defines (to resolve auto-mapping aliases).
    """

    folder: str
    file: str
    decorated: bool
    loss_functions: tuple[str, ...]
    classes: dict[str, tuple[str, ...]]
    defined: frozenset[str]

    @property
    def is_moe(self) -> bool:
        kinds = sum(bool(names) for names in self.classes.values())
        return self.decorated or bool(self.loss_functions) or kinds >= 2

    def describe(self) -> str:
        parts = [self.file + ":"]
        if self.decorated:
            parts.append(DECORATOR)
        parts += [f"{fn}()" for fn in self.loss_functions]
        for kind, names in self.classes.items():
            if names:
                parts.append(f"{kind} {'/'.join(names)}")
        return " ".join(parts)


def transformers_models_dir() -> Path:
    import transformers

    return Path(transformers.__file__).parent / "models"


def scan_source(folder: str, file: str, source: str) -> ModuleEvidence:
    """Evidence found in one modeling file's source text."""
    defined = CLASS.findall(source)
    classes: dict[str, list[str]] = {kind: [] for kind, _ in CLASS_KINDS}
    for name in defined:
        kind = next((k for k, pattern in CLASS_KINDS if pattern.search(name)), None)
        if kind is not None and "PreTrained" not in name:
            classes[kind].append(name)
    return ModuleEvidence(
        folder=folder,
        file=file,
        decorated=DECORATOR in source,
        loss_functions=tuple(dict.fromkeys(LOSS_FUNCTION.findall(source))),
        classes={k: tuple(v) for k, v in classes.items()},
        defined=frozenset(defined),
    )


@lru_cache(maxsize=1)
def scan_modeling_sources() -> dict[str, tuple[ModuleEvidence, ...]]:
    """Every modeling file of the installed transformers, scanned, by folder."""
    by_folder: dict[str, list[ModuleEvidence]] = {}
    for path in sorted(transformers_models_dir().glob("*/modeling_*.py")):
        evidence = scan_source(path.parent.name, path.name, path.read_text(encoding="utf-8"))
        by_folder.setdefault(evidence.folder, []).append(evidence)
    return {folder: tuple(files) for folder, files in by_folder.items()}


def moe_folders() -> dict[str, str]:
    """Modeling folders with token-level MoE code → evidence (known false positives dropped)."""
    found = {}
    for folder, files in scan_modeling_sources().items():
        moe = [f for f in files if f.is_moe]
        if moe and folder not in KNOWN_FALSE_POSITIVES:
            found[folder] = "; ".join(f.describe() for f in moe)
    return found


def _config_has_experts(config_cls: type, depth: int = 0) -> bool:
    """Does the config class (or one of its sub-configs) declare an expert field?"""
    if dataclasses.is_dataclass(config_cls):
        names = [f.name for f in dataclasses.fields(config_cls)]
    else:  # older, non-dataclass configs: fall back to the annotations
        names = [n for klass in config_cls.__mro__ for n in getattr(klass, "__annotations__", {})]
    if any(EXPERT_FIELD.search(n) for n in names):
        return True
    subs = getattr(config_cls, "sub_configs", None) or {}
    return depth < 2 and any(isinstance(s, type) and _config_has_experts(s, depth + 1) for s in subs.values())


@lru_cache(maxsize=1)
def discover_moe_model_types() -> dict[str, str]:
    """MoE model types of the installed transformers → evidence string.

    A type counts when its modeling folder has MoE code *and* its config (or a sub-config) declares
    experts (this keeps ``qwen3_5_moe`` and ``qwen3_5_moe_text`` but drops ``qwen3_5_moe_vision``), or
    when its auto model class is defined in an MoE folder (``sarvam_mla`` → ``DeepseekV3Model``).
    """
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    folders = moe_folders()
    owner = {cls: folder for folder in folders for ev in scan_modeling_sources()[folder] for cls in ev.defined}
    found: dict[str, str] = {}
    for model_type in CONFIG_MAPPING_NAMES:
        folder = model_type_to_module_name(model_type)
        if folder in folders:
            try:
                has_experts = _config_has_experts(CONFIG_MAPPING[model_type])
            except Exception:  # a config that cannot be imported: trust the folder
                has_experts = True
            if has_experts:
                found[model_type] = folders[folder]
            continue
        model_cls = MODEL_MAPPING_NAMES.get(model_type)
        model_names = model_cls if isinstance(model_cls, tuple) else (model_cls,)
        for name in model_names:
            if name in owner:
                found[model_type] = f"alias: auto model class {name} is defined in MoE folder {owner[name]}"
                break
    return found


def unsupported_model_types() -> dict[str, str]:
    """MoE model types deliberately not registered → reason."""
    return dict(DECLARED_UNSUPPORTED)


def uncovered() -> list[str]:
    """Discovered MoE model types neither registered nor declared unsupported (sorted)."""
    from moeconf import registry

    declared = unsupported_model_types()
    return sorted(t for t in discover_moe_model_types() if t not in registry.REGISTRY and t not in declared)


__all__ = [
    "DECLARED_UNSUPPORTED",
    "KNOWN_FALSE_POSITIVES",
    "ModuleEvidence",
    "discover_moe_model_types",
    "moe_folders",
    "scan_modeling_sources",
    "scan_source",
    "uncovered",
    "unsupported_model_types",
]
