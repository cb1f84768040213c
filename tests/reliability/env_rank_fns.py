"""Rank functions for test_environment (standard library only: ranks that need no torch start fast)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def sleep_in_rank() -> None:
    """Never returns: the parent is what gets interrupted."""
    time.sleep(10_000)


def return_rank() -> int:
    return int(os.environ["RANK"])


def write_into_extensions_dir(*_args: object) -> None:
    """Rank 1 writes into the torch-extension dir, as a JIT build does; with an unusable dir it dies
    of the machine's fault (rank 0 waits, as a peer in a collective would)."""
    if os.environ["RANK"] == "1":
        (Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm").mkdir(parents=True, exist_ok=True)
    time.sleep(10_000)


def raise_value_error(*_args: object) -> None:
    """A bug of the code under test: must stay a failure, never be excused as the machine's."""
    if os.environ["RANK"] == "1":
        raise ValueError("expert 3 got 5 tokens, expected 4")
    time.sleep(10_000)
