"""Partition checks: a multi-step, multi-rank observation against the single-process reference."""

from __future__ import annotations

import torch

from moeconf.backends.base import StepsObservation
from moeconf.harness.checks import TOLERANCES, Outcome, Tolerance, compare, merge
from moeconf.harness.steps import StepsReference

STEPS_CASE = "adversarial_steps"
PARTITION_CHECKS = (
    "no_hang",
    "partition_output",
    "partition_losses",
    "partition_grads",
    "partition_zero_grads",
    "partition_params",
)


def steps_outcomes(ref: StepsReference, obs: StepsObservation, dtype: str) -> dict[str, Outcome]:
    """One outcome per partition check (the run finished, so ``no_hang`` passes)."""
    tol = TOLERANCES[dtype]
    outputs = [
        compare(f"step {s} rank {r} output", got, want, tol["output"])
        for s, (gots, wants) in enumerate(zip(obs.outputs, ref.outputs))
        for r, (got, want) in enumerate(zip(gots, wants))
    ]
    grads = [
        compare(f"step {s} grad {name}", obs.grads[s].get(name), want, tol["grad"])
        for s, step in enumerate(ref.grads)
        for name, want in step.items()
    ]
    params = [
        compare(f"step {s} param {name}", obs.params_after[s].get(name), want, tol["grad"])
        for s, step in enumerate(ref.params_after)
        for name, want in step.items()
        if name in ref.grads[s]
    ]
    zero_problems = []
    for s, idle in enumerate(ref.idle_experts):
        zero_problems += [f"step {s}: grad {m} is None" for m in obs.missing_grads[s] if m.startswith("experts.")]
        for name, grad in obs.grads[s].items():
            if name.startswith("experts.") and grad is not None:
                zero_problems += [
                    f"step {s}: idle expert {e} has non-zero grad {name}" for e in idle if bool((grad[e] != 0).any())
                ]
    zero = Outcome(not zero_problems, message="; ".join(zero_problems[:3]))
    return {
        "no_hang": Outcome(True),
        "partition_output": merge(outputs),
        "partition_losses": _losses_outcome(ref, obs, tol["loss"]),
        "partition_grads": merge(grads),
        "partition_zero_grads": zero,
        "partition_params": merge(params),
    }


def _losses_outcome(ref: StepsReference, obs: StepsObservation, tol: Tolerance) -> Outcome:
    """Each rank's aux and z losses, per step and micro-batch, vs the reference's for that rank's
    tokens. Their *weight* in the gradient (the effective coefficient under data parallelism and
    accumulation) is judged by ``partition_grads``, whose reference weighs them the same way."""
    if not any(r for step in ref.losses for r in step):
        return Outcome(
            None, message="the steps weigh no router loss (architecture without one, or the backend's steps do not)"
        )
    if obs.losses is None:
        return Outcome(None, message="backend does not report the router losses of its steps")
    parts, absent = [], []
    for s, (wants, gots) in enumerate(zip(ref.losses, obs.losses)):
        for r, (want, got) in enumerate(zip(wants, gots)):
            for name, values in want.items():
                seen = got.get(name) if isinstance(got, dict) else None
                if seen is None or len(seen) != len(values) or any(v is None for v in seen):
                    absent.append(f"step {s} rank {r}: {name} not computed (got {seen})")
                    continue
                parts.append(
                    compare(
                        f"step {s} rank {r} {name}",
                        torch.tensor(seen, dtype=torch.float64),
                        torch.tensor(values, dtype=torch.float64),
                        tol,
                    )
                )
    if absent:
        return Outcome(False, tol=tol, message="; ".join(absent[:2]))
    return merge(parts)
