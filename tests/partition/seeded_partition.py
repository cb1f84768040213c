"""Multi-rank backends with a seeded bug in the rank job (``--backend tests.partition.seeded_partition:NAME``)."""

from __future__ import annotations

from moeconf.backends.partitioned import PartitionedBackend

lr_doubled = PartitionedBackend(
    "fsdp2-lr-doubled", "fsdp2", dense=True, rank_fn="tests.partition.rank_fns:run_job_lr_doubled"
)
dirty_idle_grads = PartitionedBackend(
    "fsdp2-dirty-idle-grads", "fsdp2", dense=True, rank_fn="tests.partition.rank_fns:run_job_dirty_idle_grads"
)
output_scaled = PartitionedBackend(
    "fsdp2-output-scaled", "fsdp2", dense=True, rank_fn="tests.partition.rank_fns:run_job_output_scaled"
)

aux_scaled_by_world_size = PartitionedBackend(
    "zero2-aux-scaled-by-world-size",
    "zero2",
    dense=True,
    rank_fn="tests.partition.rank_fns:run_job_aux_scaled_by_world_size",
)
aux_detached = PartitionedBackend(
    "zero3-aux-detached", "zero3", leaf=True, rank_fn="tests.partition.rank_fns:run_job_aux_detached"
)
stale_aux = PartitionedBackend(
    "fsdp2-stale-aux", "fsdp2", dense=True, rank_fn="tests.partition.rank_fns:run_job_stale_aux"
)

# bug → partition checks that must go red, and those that must stay green
SEEDED_PARTITION: dict[str, tuple[set[str], set[str]]] = {
    # later steps then route differently too, so only no_hang must stay green
    "lr_doubled": ({"partition_params"}, {"no_hang"}),
    "dirty_idle_grads": ({"partition_zero_grads"}, {"no_hang", "partition_output", "partition_params"}),
    "output_scaled": ({"partition_output", "partition_grads"}, {"no_hang", "partition_zero_grads"}),
    # the router losses' values are right, their weight in the gradient is not (then the params
    # move elsewhere, and later steps route differently: only no_hang must stay green)
    "aux_scaled_by_world_size": ({"partition_grads", "partition_params"}, {"no_hang"}),
    "aux_detached": ({"partition_grads", "partition_params"}, {"no_hang"}),
    "stale_aux": ({"partition_losses", "partition_grads"}, {"no_hang"}),
}
