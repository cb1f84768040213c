"""``python -m moeconf.bench [options]``: ``moeconf bench`` before (and besides) the main CLI."""

import sys

from moeconf.bench.cli import main

sys.exit(main())
