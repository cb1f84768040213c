"""``moeconf check`` for ranks that an outside launcher started (torchrun, deepspeed, srun).

``torchrun --nnodes N --nproc-per-node P ... -m moeconf.partition check --backend zero3-leaf ...``
runs on every rank; each joins the job's process group from the standard environment
(``moeconf.distributed.torchrun``), runs the engine with the multi-rank backends replaced by their
in-group form (``moeconf.partition.backend``) and gets the same records as ``moeconf check``; rank 0
writes the report. See docs/multi-node.md.
"""
