"""Harness internals: cases (inputs), checks, the engine, record statuses, validation, the per-call
watchdog and reports. ``engine.run_selection`` is the one path every front (CLI, suites) takes."""
