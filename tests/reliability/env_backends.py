"""Multi-rank backends for test_environment, resolved by ``--backend tests.reliability.env_backends:NAME``."""

from __future__ import annotations

import dataclasses

from moeconf.backends.partitioned import FSDP2_DENSE, ZERO3_LEAF

RANK_FNS = "tests.reliability.env_rank_fns"

# A DeepSpeed backend that gives up on a live build lock after 1 s instead of 10 minutes.
zero3_leaf_short_wait = dataclasses.replace(ZERO3_LEAF, lock_wait_s=1.0)
# FSDP2 backends whose rank job is a function of env_rank_fns (no DeepSpeed needed).
ranks_write_extensions_dir = dataclasses.replace(
    FSDP2_DENSE, name="fsdp2-env-probe", rank_fn=f"{RANK_FNS}:write_into_extensions_dir", deadline_s=60.0
)
ranks_raise_value_error = dataclasses.replace(
    FSDP2_DENSE, name="fsdp2-bug-probe", rank_fn=f"{RANK_FNS}:raise_value_error", deadline_s=60.0
)
