#!/usr/bin/env python3
"""`make chaos`: the fault suites, longer (PGREACT_CHAOS_SCALE, default 5), and a soak table:
case, driver, handler, changes, lost, dup, out-of-order, dead, recovery, and a case's own
figures (throughput under poison, backlog after an exhaustion, log lines on a standby)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    scale = os.environ.get("PGREACT_CHAOS_SCALE", "5")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "chaos.jsonl"
        env = {**os.environ, "PGREACT_CHAOS_SCALE": scale, "PGREACT_CHAOS_REPORT": str(report)}
        result = subprocess.run(  # noqa: S603 - our own interpreter
            [
                sys.executable,
                "-m",
                "pytest",
                "tests/test_faults.py",
                "tests/test_faults_recovery.py",
                "-q",
                "-p",
                "no:randomly",
                "-o",
                "timeout=900",
                *sys.argv[1:],
            ],
            cwd=ROOT,
            env=env,
            check=False,
        )
        rows = (
            [json.loads(line) for line in report.read_text().splitlines()]
            if report.exists()
            else []
        )
    header = [
        "case",
        "driver",
        "handler",
        "changes",
        "lost",
        "dup",
        "out-of-order",
        "dead",
        "recovery",
        "note",
    ]
    table = [header] + [
        [
            r["case"],
            r["driver"],
            r["handler"],
            str(r["changes"]),
            str(r["lost"]),
            str(r["duplicates"]),
            str(r["out_of_order"]),
            str(r["dead"]),
            "-" if r["recovery"] is None else f"{r['recovery']:.2f}s",
            r.get("note") or "",
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print(f"\nchaos soak, scale {scale}:")
    for row in table:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
