"""Tools around the gate: ``discover`` (propose an entry for a new model type), ``audit`` (the
configuration audit behind ``--check config``), ``coverage`` (every transformers MoE type is
registered or declared unsupported)."""
