"""``python -m moeconf`` is the ``moeconf`` command."""

import sys

from moeconf.cli import main

sys.exit(main(program="python -m moeconf"))
