"""Partition checks: a multi-step, multi-rank observation against the single-process reference."""

from __future__ import annotations

from moeconf.backends.base import StepsObservation
from moeconf.harness.checks import TOLERANCES, Outcome, compare, merge
from moeconf.harness.steps import StepsReference

STEPS_CASE = "adversarial_steps"
PARTITION_CHECKS = ("no_hang", "partition_output", "partition_grads", "partition_zero_grads", "partition_params")


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
        "partition_grads": merge(grads),
        "partition_zero_grads": zero,
        "partition_params": merge(params),
    }
