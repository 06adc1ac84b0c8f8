"""pgreact's benchmark suite: ``python -m benchmarks.run`` (``make bench``).

Modules, in the order an invocation uses them:

- :mod:`benchmarks.server` — the PostgreSQL under test (an embedded server started for the run,
  or ``--url``), scratch databases cloned from templates, server CPU accounting, machine facts.
- :mod:`benchmarks.workload` — the source/effects tables and the handlers under test.
- :mod:`benchmarks.writers` — change producers (burst and paced), run in the orchestrator.
- :mod:`benchmarks.worker` — the measured process: a pgreact daemon, the bare asyncpg
  baseline loop, or a PgQueuer consumer, forked from a pre-imported fork server so no import
  time is measured.
- :mod:`benchmarks.pgbench` — writer-side INSERT rates with and without the capture trigger.
- :mod:`benchmarks.report` — statistics, the printed table, the JSON file.
"""
