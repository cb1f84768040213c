"""Partitioning: multi-rank runs (DeepSpeed ZeRO-2/3, torch FSDP2) of a registry block against the
single-process reference, with adversarial routing and a hang watchdog.

- ``steps``: the multi-step adversarial case (per-rank disjoint expert subsets) and its reference.
- ``dense``: the dense patched block (every expert sees every token, weight 0 outside the top-k).
- ``rank_job``: what each rank runs (build, wrap, forward/backward/step, gather full grads/params).
- ``checks``: partition checks over a multi-step observation.
"""
