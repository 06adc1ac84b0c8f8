"""Writer-side cost of capture: single-row autocommit INSERTs through ``pgbench``.

The same script runs against a database without pgreact and one where the capture trigger is
installed with one handler subscribed (no daemon running: this isolates what a writer pays).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SCRIPT = """\
\\set account random(1, 997)
\\set cents random(1, 99999)
INSERT INTO source (account, amount, status, note)
VALUES (:account, :cents / 100.0, 'new', 'order from pgbench, padded to a realistic width');
"""

_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class PgbenchResult:
    clients: int
    tps: float
    latency_ms: float


def run_pgbench(
    bin_path: Path, url: str, clients: int, seconds: float, *, transactions: int | None = None
) -> PgbenchResult:
    """``pgbench -n -M prepared -f script -c N -j min(N, 2) -T secs`` against ``url`` (or
    ``-t`` with ``transactions`` shared among the clients, for a quick smoke run)."""
    if transactions is None:
        length = ["-T", str(max(1, round(seconds)))]
    else:
        length = ["-t", str(max(1, math.ceil(transactions / clients)))]
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as fh:
        fh.write(SCRIPT)
        script = fh.name
    try:
        cmd = [
            str(bin_path / "pgbench"),
            *("-n", "-M", "prepared", "-f", script),
            *("-c", str(clients), "-j", str(min(clients, 2)), *length),
            url,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=seconds + 60, check=False
        )
    finally:
        os.unlink(script)
    out = proc.stdout + proc.stderr
    tps, latency = _TPS.search(out), _LATENCY.search(out)
    failed = _FAILED.search(out)
    if proc.returncode != 0 or tps is None or latency is None or (failed and int(failed[1])):
        raise RuntimeError(f"pgbench failed (exit {proc.returncode}):\n{out[-2000:]}")
    return PgbenchResult(clients, float(tps[1]), float(latency[1]))
