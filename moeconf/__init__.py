"""moeconf: a conformance harness for Mixture-of-Experts layers.

The four nouns, first:

- ``spec``       ``MoESpec``: one MoE layer, architecture-neutral (``Literal`` options, no behaviour).
- ``reference``  the float64 MoE that *defines* routing, weights, output, losses and gradients.
- ``backends``   the code under test behind one ``Backend`` protocol (HF blocks, kernels, ZeRO/FSDP2 ranks).
- ``suites``     the pytest suites (parity, partition, perf), generic over registry × backends.

Supporting packages:

- ``registry``    one declarative entry per HF ``model_type`` (tiny config, block, spec, bindings).
- ``harness``     cases, checks, the engine (the one path), statuses, validation, watchdog, reports.
- ``hf``          the transformers block adapter (build, load canonical parameters, observe).
- ``distributed`` the multi-rank launcher with a hang watchdog; DeepSpeed's CPU op build.
- ``npu``         an exact pure-torch emulator of the torch_npu MoE ops.
- ``bench``       the performance engine behind ``moeconf bench`` and the perf suite.
- ``tools``       ``discover``, the configuration audit, the coverage guard.
- ``params``, ``devices``, ``cli``: canonical parameter names, device/dtype names, the command line.
"""

__version__ = "0.1.0"
