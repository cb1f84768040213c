"""Harness tests: keep transformers quiet and offline."""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moeconf.devices import use_threads_for_tiny_shapes

use_threads_for_tiny_shapes()
