"""moeconf: a conformance harness for Mixture-of-Experts layers.

Nouns: a ``MoESpec`` describes a layer; the reference (``moeconf.reference``) defines what it must
compute; a ``Backend`` runs the code under test; a check compares one quantity and yields a
``CheckResult``. The registry (``moeconf.registry``) ties HF model types to specs.
"""

__version__ = "0.1.0"
