"""``ep-alltoall``: expert parallelism with all_to_all dispatch on 2 and 4 CPU ranks, judged by the
standard checks against the float64 reference; its negative controls caught.

Kept to few launches (each costs ~10 s of imports per rank on the 2-core runner): one launch per
world size runs every case of qwen3_moe, mixtral and deepseek_v3 (a case carries its own entry)
plus the adversarial steps of one architecture; each control is one launch of one case.
"""

from __future__ import annotations

import dataclasses
import time
from functools import cache

import pytest
import torch

from moeconf.backends.base import RankFailure, RunRequest
from moeconf.backends.ep_alltoall import EP_ALLTOALL, EP_ALLTOALL_4, EPAllToAllBackend, ep_reason
from moeconf.backends.ep_rank import EPResult, expert_split
from moeconf.distributed import processes_with_env
from moeconf.distributed.launcher import RUN_ID_ENV
from moeconf.harness.cases import CASES, make_inputs
from moeconf.harness.checks import CHECKS, CheckInput, Outcome, applicable_checks
from moeconf.harness.partition_checks import steps_outcomes
from moeconf.harness.steps import make_steps
from moeconf.harness.validate import validate_observation, validate_steps
from moeconf.reference import reference_forward, reference_gradients, reference_loss_gradients
from moeconf.registry import REGISTRY

ARCHS = ("qwen3_moe", "mixtral", "deepseek_v3")
# Under transformers 4.x these entries are per-expert ModuleLists, a layout ep-alltoall declares
# unsupported (``supports()`` says why): nothing here applies there.
UNSUPPORTED = next((f"{a}: {r}" for a in ARCHS if (r := ep_reason(REGISTRY[a])) is not None), None)
pytestmark = [
    pytest.mark.partition,
    pytest.mark.skipif(UNSUPPORTED is not None, reason=f"ep-alltoall does not run here ({UNSUPPORTED})"),
]
STEPS_ARCH = {2: "qwen3_moe", 4: "deepseek_v3"}
BACKENDS = {2: EP_ALLTOALL, 4: EP_ALLTOALL_4}
MUST_PASS = ("routing", "routing_weights", "output", "grad_input", "grad_router", "grad_experts")
CONTROL_DEADLINE_S = 60.0


def _requests(dtype: torch.dtype = torch.float32) -> list[tuple[str, str, RunRequest]]:
    out = []
    for arch in ARCHS:
        entry = REGISTRY[arch]
        for case in CASES:
            inputs = make_inputs(entry.spec, case, dtype, 0)
            request = RunRequest(
                entry, inputs.params, inputs.hidden, inputs.attention_mask, inputs.grad_output, dtype, "cpu"
            )
            out.append((arch, case.name, request))
    return out


def _judge(request: RunRequest, obs: object) -> dict[str, Outcome]:
    spec = request.entry.spec
    obs = validate_observation(obs, request)
    ci = CheckInput(
        spec,
        reference_forward(spec, request.params, request.hidden, request.attention_mask),
        reference_gradients(spec, request.params, request.hidden, request.grad_output),
        obs,
        "fp32",
        reference_loss_gradients(spec, request.params, request.hidden, request.attention_mask),
    )
    return {name: CHECKS[name](ci) for name in applicable_checks(spec)}


@cache
def _session(world: int) -> tuple[list[tuple[str, str, RunRequest]], list[EPResult], object, float]:
    """One launch per world size: every case of ARCHS plus the steps of STEPS_ARCH[world]."""
    requests = _requests()
    steps, steps_ref = make_steps(REGISTRY[STEPS_ARCH[world]], torch.float32, "cpu")
    start = time.monotonic()
    results = BACKENDS[world].launch([r for _, _, r in requests], steps)
    return requests, results, (steps, steps_ref), time.monotonic() - start


def test_expert_split_is_contiguous_and_documented() -> None:
    assert expert_split(8, 2) == [(0, 4), (4, 8)]
    assert expert_split(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert expert_split(6, 4) == [(0, 2), (2, 4), (4, 5), (5, 6)]  # E % W: the first ranks one more
    assert expert_split(3, 4) == [(0, 1), (1, 2), (2, 3), (3, 3)]  # a rank may own none


def test_supports_fused_swiglu_families_only() -> None:
    for arch in ("qwen3_moe", "mixtral", "deepseek_v3", "olmoe"):
        assert ep_reason(REGISTRY[arch]) is None, arch
    reason = ep_reason(REGISTRY["gpt_oss"])
    assert reason is not None and "fused SwiGLU" in reason


@pytest.mark.parametrize("world", [2, 4])
def test_ep_alltoall_matches_the_reference(world: int) -> None:
    requests, results, (steps, steps_ref), elapsed = _session(world)
    assert [r.rank for r in results] == list(range(world))
    lead = results[0]
    problems = []
    for (arch, case, request), obs in zip(requests, lead.cases):
        outcomes = _judge(request, obs)
        problems += [f"{arch}/{case}/{c}: {outcomes[c].message}" for c in MUST_PASS if outcomes[c].passed is not True]
        # the arch's own optional checks: shared experts, and the router losses (global statistics)
        for c in ("grad_shared_experts", "aux_loss", "z_loss"):
            if c in outcomes and outcomes[c].passed is not True:
                problems.append(f"{arch}/{case}/{c}: {outcomes[c].message}")
    assert not problems, problems
    assert lead.steps is not None and lead.steps_outputs is not None
    from moeconf.backends.base import StepsObservation

    steps_obs = validate_steps(
        StepsObservation(
            lead.steps_outputs,
            [s.grads for s in lead.steps],
            [s.missing_grads for s in lead.steps],
            [s.params_after for s in lead.steps],
        ),
        steps,
    )
    outcomes = steps_outcomes(steps_ref, steps_obs, "fp32")
    red = {k: o.message for k, o in outcomes.items() if o.passed is not True and k != "partition_losses"}
    assert not red, red
    assert outcomes["partition_losses"].passed is None  # EP's steps weigh no router loss (docs/expert-parallel.md)
    print(f"world {world}: {len(requests)} cases + 3 steps in one launch, {elapsed:.1f} s")


@pytest.mark.parametrize("world", [2, 4])
def test_the_cases_cover_idle_ranks_and_idle_experts(world: int) -> None:
    """The run above really had ranks without tokens and experts without tokens anywhere."""
    requests, results, _, _ = _session(world)
    names = [(arch, case) for arch, case, _ in requests]
    # traffic[case][forward]: this rank's sends (per destination) and receives (per source)
    no_local_tokens = {names[i] for r in results for i, t in enumerate(r.traffic) if sum(t[0].sent) == 0}
    received_nothing = {names[i] for r in results for i, t in enumerate(r.traffic) if sum(t[0].received) == 0}
    assert {(a, "single_token") for a in ARCHS} <= no_local_tokens  # T=1: one rank has the token
    if world == 4:  # k=2 experts for one token: at least two ranks own no chosen expert
        assert {(a, "single_token") for a in ARCHS} <= received_nothing
    for (arch, case, request), obs in zip(requests, results[0].cases):
        if case == "empty_expert":
            idle = request.entry.spec.num_experts - 1
            assert obs.topk_index is not None and not bool((obs.topk_index == idle).any())
            assert obs.grads["experts.w_up"] is not None and bool((obs.grads["experts.w_up"][idle] == 0).all())


@pytest.mark.parametrize("bug", ["wrong-splits", "no-count-exchange"])
def test_registered_negative_control_is_caught(bug: str) -> None:
    """A wrong split and a missing count exchange never pass: the ranks crash or hang, reported with
    every rank's evidence, within the deadline, leaving no process behind."""
    control = dataclasses.replace(EPAllToAllBackend(f"ep-alltoall-{bug}", bug=bug), deadline_s=CONTROL_DEADLINE_S)
    assert control.negative_control
    request = next(r for arch, case, r in _requests() if (arch, case) == ("qwen3_moe", "random"))
    start = time.monotonic()
    with pytest.raises(RankFailure) as caught:
        control.run_session([request], None)
    assert time.monotonic() - start < CONTROL_DEADLINE_S + 30
    exc = caught.value
    assert exc.summary.startswith(("hang:", "crash:")) and "\n" not in exc.summary
    assert "--- rank 0" in exc.detail and "--- rank 1" in exc.detail
    assert "all_to_all_single" in exc.summary or "all_to_all_single" in exc.detail
    assert processes_with_env(RUN_ID_ENV, exc.run_id) == []


def test_silent_dispatch_bug_turns_the_checks_red() -> None:
    """Results returned in expert order instead of arrival order: no collective notices; the output
    and gradient checks must (and the routing checks must not)."""
    control = EPAllToAllBackend("ep-alltoall-no-unpermute", bug="no-unpermute")
    request = next(r for arch, case, r in _requests() if (arch, case) == ("qwen3_moe", "random"))
    [obs], _ = control.run_session([request], None)
    outcomes = _judge(request, obs)
    red = {c for c, o in outcomes.items() if o.passed is False}
    assert {"output", "grad_input", "grad_experts"} <= red, red
    assert not ({"routing", "routing_weights"} & red), red
