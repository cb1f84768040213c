"""Gemma 4 / DiffusionGemma: the new reference formulas on hand-checked values, the block adapter against the
real decoder layers, and proof that each new feature can fail (seeded bugs turn the intended check red; the
real blocks pass).

The seeded backends plug in as an outsider's would (``--backend tests.test_gemma4_family:NAME``).
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from torch import nn

from moeconf.backends import HFBlockBackend
from moeconf.harness.cases import draw_params
from moeconf.hf.adapters import Gemma4MoEBranch
from moeconf.hf.block import block_class, block_config, build_block, build_config, load_params
from moeconf.reference import reference_forward, route
from moeconf.registry import REGISTRY, ArchEntry
from moeconf.spec import MoESpec, RouterSpec
from tests.records import assert_caught, records_of, red

ARCHS = ("gemma4", "gemma4_text", "diffusion_gemma", "diffusion_gemma_text")

# --- the reference ---------------------------------------------------------------------------------


def test_router_input_norm_and_expert_scale_on_hand_checked_values() -> None:
    """x = [3, 4]: rms = sqrt((9 + 16) / 2) = 5/√2, so rms(x) = [0.6√2, 0.8√2]; ⊙ [1, 0.5] = [0.6√2, 0.4√2].
    W = I, × H^-½ = 1/√2: ℓ = [0.6, 0.4]. Softmax, top-2 of 2, renormalised: [σ(0.2), σ(-0.2)];
    × expert_scale [2, -1] → [2σ(0.2), -σ(-0.2)] (sum ≠ 1: the scale comes after the renormalisation)."""
    router = RouterSpec(renorm="always", input_norm_eps=0.0, logit_multiplier=2**-0.5, expert_scale=True)
    spec = MoESpec(2, 2, 2, 3, router=router)
    params = {
        "router.weight": torch.eye(2, dtype=torch.float64),
        "router.input_norm.weight": torch.tensor([1.0, 0.5], dtype=torch.float64),
        "router.expert_scale": torch.tensor([2.0, -1.0], dtype=torch.float64),
    }
    routing = route(spec, params, torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    assert torch.allclose(routing.logits, torch.tensor([[0.6, 0.4]], dtype=torch.float64))
    sig = 1 / (1 + math.exp(-0.2))
    assert routing.index.tolist() == [[0, 1]]
    assert torch.allclose(routing.weights, torch.tensor([[2 * sig, -(1 - sig)]], dtype=torch.float64))


def test_routed_norms_wrap_only_the_routed_experts() -> None:
    """One expert, k = 1, weight 1, a linear expert (relu of a positive input) = identity:
    out = rms(rms(x) ⊙ a) ⊙ b, where the router's input is x itself (its logit does not matter with E = 1).
    With x = [3, 4], a = [1, 2]: rms(x) ⊙ a = [0.6√2, 1.6√2]; its rms: ÷ sqrt((0.72 + 5.12) / 2) = √2.92."""
    from moeconf.spec import ExpertSpec

    spec = MoESpec(
        1,
        1,
        2,
        2,
        experts=ExpertSpec(activation="relu", glu="none"),
        routed_input_norm_eps=0.0,
        routed_output_norm_eps=0.0,
    )
    eye = torch.eye(2, dtype=torch.float64)
    params = {
        "router.weight": torch.zeros(1, 2, dtype=torch.float64),
        "experts.w_up": eye[None],
        "experts.w_down": eye[None],
        "routed_input_norm.weight": torch.tensor([1.0, 2.0], dtype=torch.float64),
        "routed_output_norm.weight": torch.tensor([1.0, -3.0], dtype=torch.float64),
    }
    out = reference_forward(spec, params, torch.tensor([[[3.0, 4.0]]], dtype=torch.float64)).output
    normed = torch.tensor([0.6, 1.6], dtype=torch.float64) * math.sqrt(2)
    expected = normed / math.sqrt(float(normed.square().mean())) * torch.tensor([1.0, -3.0], dtype=torch.float64)
    assert torch.allclose(out.reshape(-1), expected)


def test_new_options_default_off_and_refuse_a_latent_moe() -> None:
    from moeconf.params import param_shapes
    from moeconf.spec import LatentSpec

    plain = MoESpec(4, 2, 8, 6)
    assert not {"router.input_norm.weight", "router.expert_scale"} & set(param_shapes(plain))
    with pytest.raises(ValueError, match="routed input/output norm"):
        MoESpec(4, 2, 8, 6, latent=LatentSpec(4, 1e-6, 1e-6), routed_output_norm_eps=1e-6)


# --- the adapter against the real decoder layers -------------------------------------------------


def _layer_branch(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, moe)`` while the whole real layer runs on ``hidden [B, S, H]``: ``x`` the feed-forward residual
    (what its ``pre_feedforward_layernorm``, and so the MoE branch, reads) and ``moe`` the term its ``forward``
    adds as ``hidden_states_2`` (the output of its ``post_feedforward_layernorm_2``)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        layer.post_feedforward_layernorm_2.register_forward_hook(lambda _m, _a, out: seen.__setitem__("moe", out)),
        layer.pre_feedforward_layernorm.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0])),
    ]
    config = layer.config
    rotary = {
        "gemma4": transformers.models.gemma4.modeling_gemma4.Gemma4TextRotaryEmbedding,
        "diffusion_gemma": transformers.models.diffusion_gemma.modeling_diffusion_gemma.DiffusionGemmaTextRotaryEmbedding,
    }["diffusion_gemma" if "Diffusion" in type(layer).__name__ else "gemma4"](config)
    positions = torch.arange(hidden.shape[1])[None].expand(hidden.shape[0], -1)
    try:
        embeddings = rotary(hidden, positions, config.layer_types[0])
        # Gemma 4 layers store their K/V for later KV-sharing layers into a dict the model passes down.
        extra = {} if "Diffusion" in type(layer).__name__ else {"shared_kv_states": {}}
        layer(hidden, position_embeddings=embeddings, position_ids=positions, **extra)
    finally:
        for handle in handles:
            handle.remove()
    return seen["x"], seen["moe"]


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_computes_the_decoder_layers_moe_branch(arch: str) -> None:
    """The adapter on the layer's feed-forward residual equals, bit for bit, the MoE term the real layer adds
    (entries loaded with the canonical parameters, the rest of the layer as initialised)."""
    entry = REGISTRY[arch]
    torch.manual_seed(0)
    config = block_config(entry, build_config(entry))
    layer = block_class(entry)(config, layer_idx=0).eval()
    for name, p in layer.named_parameters():  # a layer that is not identity anywhere
        nn.init.normal_(
            p, 1.0 if name.endswith(("norm.weight", "layernorm.weight", "layernorm_1.weight")) else 0.0, 0.2
        )
    branch = Gemma4MoEBranch(layer)
    load_params(entry, branch, draw_params(entry.spec, 0))  # writes into the layer's own tensors
    x, want = _layer_branch(layer, torch.randn(2, 5, entry.spec.hidden))
    assert torch.equal(branch(x), want)


def test_every_registered_layer_class_is_checked() -> None:
    """DiffusionGemma's encoder and decoder layers both hold the branch: each is some entry's block."""
    classes = {REGISTRY[a].block_class for a in ARCHS}
    assert classes == {"Gemma4TextDecoderLayer", "DiffusionGemmaEncoderTextLayer", "DiffusionGemmaDecoderTextLayer"}


def test_the_model_records_probabilities_and_computes_no_aux_loss() -> None:
    """Upstream finding (docs/transformers-moe-landscape.md): ``outputs.router_logits`` rows sum to 1 (index 0 of
    ``Gemma4TextRouter``'s output is the softmax), and with ``output_router_logits=True`` and labels the loss is
    the cross-entropy alone: nothing applies a second softmax, so no declared bug; the entries have no aux loss."""
    entry = REGISTRY["gemma4_text"]
    torch.manual_seed(0)
    model = transformers.Gemma4ForCausalLM(build_config(entry))
    ids = torch.randint(0, 128, (2, 6))
    out = model(ids, labels=ids, output_router_logits=True)
    (probs,) = out.router_logits
    assert torch.allclose(probs.sum(-1), torch.ones(12))
    ce = nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 128).float(), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, ce, atol=1e-5)
    assert all(REGISTRY[a].spec.losses.aux == "none" and REGISTRY[a].aux_coef_attr is None for a in ARCHS)


# --- seeded bugs ---------------------------------------------------------------------------------------


def _router_reads_raw_input(block: nn.Module, entry: ArchEntry) -> None:
    """A fused router that skips the weightless RMSNorm (feeds ``x ⊙ scale · H^-½`` to the projection)."""
    block.router.norm.forward = lambda x: x


def _no_expert_scale(block: nn.Module, entry: ArchEntry) -> None:
    """A fused router kernel without the ``per_expert_scale`` argument: renormalised top-k weights as is."""
    router = block.router
    original = router.forward

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        probs, weights, index = original(x)
        return probs, weights / router.per_expert_scale[index], index

    router.forward = forward


def _experts_read_raw_input(block: nn.Module, entry: ArchEntry) -> None:
    """A port that feeds the experts the residual instead of ``pre_feedforward_layernorm_2(x)``."""
    block.pre_feedforward_layernorm_2.forward = lambda x: x


def _routed_output_unnormed(block: nn.Module, entry: ArchEntry) -> None:
    """The routed output norm dropped (an MoE kernel that returns the weighted sum as the branch output)."""
    block.post_feedforward_layernorm_2.forward = lambda x: x


router_reads_raw_input = HFBlockBackend("router-reads-raw-input", patch=_router_reads_raw_input)
no_expert_scale = HFBlockBackend("no-expert-scale", patch=_no_expert_scale)
experts_read_raw_input = HFBlockBackend("experts-read-raw-input", patch=_experts_read_raw_input)
routed_output_unnormed = HFBlockBackend("routed-output-unnormed", patch=_routed_output_unnormed)

# bug → (checks that must go red, checks that must stay green)
SEEDED: dict[str, tuple[set[str], set[str]]] = {
    "router_reads_raw_input": ({"routing_weights", "output"}, set()),
    "no_expert_scale": ({"routing_weights", "output", "grad_router"}, {"routing"}),
    "experts_read_raw_input": ({"output", "grad_experts"}, {"routing", "routing_weights"}),
    "routed_output_unnormed": ({"output", "grad_experts"}, {"routing", "routing_weights"}),
}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("bug", sorted(SEEDED))
def test_seeded_bug_is_reported_under_the_right_check(bug: str, dtype: str) -> None:
    must_fail, must_pass = SEEDED[bug]
    assert_caught(bug, records_of("gemma4_text", f"tests.test_gemma4_family:{bug}", dtype), must_fail, must_pass)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_real_block_passes_the_same_selection(dtype: str) -> None:
    """Control: red above means the bug, not the entry."""
    records = records_of("gemma4_text", "hf-eager", dtype)
    assert red(records) == set() and not [r for r in records if r.status == "xfail"]


def test_adapter_shares_the_layers_modules() -> None:
    """A patch of the layer's experts (as a framework applies it to the model) is what the adapter runs."""
    branch = build_block(REGISTRY["gemma4_text"])
    assert isinstance(branch, Gemma4MoEBranch)
    layer = block_class(REGISTRY["gemma4_text"])(
        block_config(REGISTRY["gemma4_text"], build_config(REGISTRY["gemma4_text"])), 0
    )
    assert Gemma4MoEBranch(layer).experts is layer.experts
