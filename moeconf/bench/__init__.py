"""``moeconf bench``: the performance suite of MoE layers, sharing one engine with the pytest perf suite.

Modules: ``presets`` (checkpoint sizes, resizing a registry entry), ``flops`` (what a pass computes and
moves), ``routing`` (imposed expert loads), ``roofline`` (measured GEMM and bandwidth limits),
``timing`` (budgeted timed runs), ``memory`` (peak memory), ``gate`` (parity before speed), ``single`` /
``multirank`` (the timed calls), ``runner`` (plan → rows), ``report`` / ``plot`` / ``compare`` (outputs
and the regression gate), ``cli`` (``add_bench_arguments``, ``run_bench``). See docs/performance.md.
"""
