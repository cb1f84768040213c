"""Muse Spark's latent MoE (``MoESpec.latent``): the reference formula on hand-checked values, and proof that each
new part can fail (seeded bugs in the projections and norms turn the intended check red; the real blocks pass).

The seeded backends are ``HFBlockBackend`` patches of the shipped ``MuseSparkMoE``, as a framework's would be.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moeconf.backends import HFBlockBackend
from moeconf.backends.hf import HF_DENSE, HF_EAGER
from moeconf.params import param_shapes
from moeconf.reference import reference_forward
from moeconf.reference.moe import latent_norm
from moeconf.registry import REGISTRY, ArchEntry
from moeconf.spec import ExpertSpec, LatentSpec, MoESpec
from tests.records import judged_records, red

if "muse_spark_text" not in REGISTRY:  # transformers 4.x registers only the entries with a 4.x variant
    pytest.skip("muse_spark_text is registered on transformers 5.x only", allow_module_level=True)

MUSE = REGISTRY["muse_spark_text"]

# --- the reference ---------------------------------------------------------------------------------


def test_latent_norm_scales_after_or_before_normalising() -> None:
    """z = [3, 4], w = [0, 1] (scale 1 + w = [1, 2]), eps = 0.5.
    scale_after: [1·3, 2·4] / sqrt((9 + 16)/2 + 0.5) = [3, 8] / √13.
    scale_before: u = [3, 8], u / sqrt((9 + 64)/2 + 0.5) = [3, 8] / √37."""
    z = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    w = torch.tensor([0.0, 1.0], dtype=torch.float64)
    after = latent_norm("scale_after", z, w, 1.0, 0.5)
    before = latent_norm("scale_before", z, w, 1.0, 0.5)
    assert torch.allclose(after, torch.tensor([[3.0, 8.0]], dtype=torch.float64) / math.sqrt(13))
    assert torch.allclose(before, torch.tensor([[3.0, 8.0]], dtype=torch.float64) / math.sqrt(37))
    # offset 0: a plain learned scale (w itself).
    assert torch.allclose(
        latent_norm("scale_after", z, w, 0.0, 0.5), torch.tensor([[0.0, 4.0]]).double() / math.sqrt(13)
    )


def _one_expert_latent_spec() -> MoESpec:
    latent = LatentSpec(width=2, pre_norm_eps=0.5, post_norm_eps=0.5)
    return MoESpec(1, 1, 2, 2, experts=ExpertSpec(activation="relu", glu="none"), latent=latent)


def test_latent_block_on_a_hand_checked_token() -> None:
    """One expert (weight 1), relu(w_up z) with identity w_up / w_down, x = [3, 2]:
    P_pre = diag(1, 2) → [3, 4]; pre norm (w = 0, scale_after, eps 0.5) → [3, 4]/√13; expert → the same;
    post norm (w = [0, 1], scale_before, eps 0.5): u = [3, 8]/√13, mean(u²) = 36.5/13 → u / √(43/13) = [3, 8]/√43;
    P_post = [[1, 1], [0, 1]] → [11, 8]/√43."""
    spec = _one_expert_latent_spec()
    eye = torch.eye(2, dtype=torch.float64)
    params = {
        "router.weight": torch.ones(1, 2, dtype=torch.float64),
        "experts.w_up": eye.unsqueeze(0),
        "experts.w_down": eye.unsqueeze(0),
        "latent.w_pre": torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64),
        "latent.pre_norm.weight": torch.zeros(2, dtype=torch.float64),
        "latent.post_norm.weight": torch.tensor([0.0, 1.0], dtype=torch.float64),
        "latent.w_post": torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64),
    }
    assert set(params) == set(param_shapes(spec))
    out = reference_forward(spec, params, torch.tensor([[[3.0, 2.0]]], dtype=torch.float64)).output
    assert torch.allclose(out, torch.tensor([[[11.0, 8.0]]], dtype=torch.float64) / math.sqrt(43))


def test_latent_experts_run_at_the_latent_width() -> None:
    shapes = param_shapes(MUSE.spec)
    E, H, I, L = MUSE.spec.num_experts, MUSE.spec.hidden, MUSE.spec.intermediate, MUSE.spec.expert_width
    assert len({H, I, 2 * I, L}) == 4
    assert shapes["experts.w_up"] == (E, I, L) and shapes["experts.w_down"] == (E, L, I)
    assert shapes["latent.w_pre"] == (L, H) and shapes["latent.w_post"] == (H, L)
    assert shapes["router.weight"] == (E, H)  # the router reads x, not the latent
    plain = dataclasses.replace(MUSE.spec, latent=None)
    assert param_shapes(plain)["experts.w_up"] == (E, I, H) and not any(
        k.startswith("latent.") for k in param_shapes(plain)
    )


def test_latent_spec_refuses_what_would_add_x_into_the_latent_sum() -> None:
    latent = LatentSpec(width=2, pre_norm_eps=0.5, post_norm_eps=0.5)
    with pytest.raises(ValueError, match="latent"):
        MoESpec(2, 1, 4, 3, identity_experts=1, latent=latent)
    with pytest.raises(ValueError, match="latent"):
        MoESpec(2, 1, 4, 3, experts=ExpertSpec(weight_site="input"), latent=latent)


# --- the shipped blocks ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [HF_EAGER, HF_DENSE], ids=lambda b: b.name)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_shipped_muse_block_passes(backend: HFBlockBackend, dtype: str) -> None:
    records = judged_records(MUSE, backend, dtype)
    assert {r.status for r in records} == {"pass"}


# --- seeded bugs ---------------------------------------------------------------------------------------


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _post_norm_scale_after(block: nn.Module, entry: ArchEntry) -> None:
    """A framework's one RMSNorm kernel reused for the post-expert norm: (1 + w)·rms(y) instead of rms((1 + w)·y)."""
    norm = block.experts.post_expert_norm
    norm.forward = lambda y: (_rms(y.float(), norm.eps) * (1.0 + norm.weight.float())).type_as(y)


def _post_norm_after_combine(block: nn.Module, entry: ArchEntry) -> None:
    """A fused kernel that norms once after the weighted sum, instead of each expert's output before its weight."""
    norm = block.experts.post_expert_norm
    per_expert = norm.forward
    norm.forward = lambda y: y
    block.experts.register_forward_hook(lambda _m, _a, out: per_expert(out))


def _pre_norm_offset_dropped(block: nn.Module, entry: ArchEntry) -> None:
    """Checkpoint conversion into a plain RMSNorm: the stored offset w used as the scale (w·rms(z), not (1 + w)·rms(z))."""
    norm = block.pre_expert_norm
    norm.forward = lambda z: (_rms(z.float(), norm.eps) * norm.weight.float()).type_as(z)


def _one_eps(block: nn.Module, entry: ArchEntry) -> None:
    """One eps for both norms of the latent path (post_norm_eps also in the pre-expert norm)."""
    block.pre_expert_norm.eps = block.experts.post_expert_norm.eps


def _down_projection_frozen(block: nn.Module, entry: ArchEntry) -> None:
    """A custom down projection on a detached weight: the output is right, P_pre never trains."""
    proj = block.pre_expert_proj
    proj.forward = lambda x: F.linear(x, proj.weight.detach())


ROUTING = {"routing", "routing_weights"}

# bug → (patch, checks that must go red, checks that must stay green)
SEEDED = {
    "post_norm_scale_after": (_post_norm_scale_after, {"output", "grad_input", "grad_experts"}, ROUTING),
    "post_norm_after_combine": (_post_norm_after_combine, {"output", "grad_input", "grad_experts"}, ROUTING),
    "pre_norm_offset_dropped": (_pre_norm_offset_dropped, {"output", "grad_input", "grad_experts"}, ROUTING),
    "one_eps": (_one_eps, {"output", "grad_experts"}, ROUTING),
    "down_projection_frozen": (
        _down_projection_frozen,
        {"grad_experts"},
        ROUTING | {"output", "grad_input", "grad_router"},
    ),
}


@pytest.mark.parametrize("bug", sorted(SEEDED))
def test_latent_seeded_bug_turns_its_check_red(bug: str) -> None:
    patch, want_red, want_green = SEEDED[bug]
    records = judged_records(MUSE, HFBlockBackend(f"seeded-{bug}", patch=patch))
    got = red(records)
    assert want_red <= got, f"{bug}: expected {sorted(want_red)} red, got {sorted(got)}"
    assert not got & want_green, f"{bug}: {sorted(got & want_green)} went red too"
