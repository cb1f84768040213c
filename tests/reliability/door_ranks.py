"""A rank function for ``test_door.py`` that imports only the standard library (ranks start fast)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def sleep() -> None:
    """Mark that this rank is running, then sleep until killed."""
    marker = os.environ.get("DOOR_MARKER")
    if marker:
        Path(f"{marker}.rank{os.environ.get('RANK', '?')}").touch()
    time.sleep(600)
