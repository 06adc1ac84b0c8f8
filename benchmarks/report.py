"""Numbers in, table and JSON out: medians with min-max over runs, percentiles, histogram
quantiles, and a plain-text table renderer."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Row:
    """One line of the report: a named scenario and its per-run values for several metrics."""

    section: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    lost: int = 0
    duplicated: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, metric: str, value: float | None, unit: str) -> None:
        if value is None:
            return
        self.metrics.setdefault(metric, []).append(float(value))
        self.units[metric] = unit

    def summary(self, metric: str) -> Summary | None:
        values = self.metrics.get(metric)
        return Summary.of(values) if values else None

    def to_json(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "name": self.name,
            "params": self.params,
            "metrics": {
                m: {
                    "unit": self.units[m],
                    "median": statistics.median(v),
                    "min": min(v),
                    "max": max(v),
                    "runs": v,
                }
                for m, v in self.metrics.items()
            },
            "lost": self.lost,
            "duplicated": self.duplicated,
            "notes": self.notes,
        }


@dataclass(frozen=True, slots=True)
class Summary:
    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(statistics.median(values), min(values), max(values), len(values))

    def fmt(self, digits: int = 0, scale: float = 1.0) -> str:
        def f(x: float) -> str:
            return f"{x * scale:,.{digits}f}"

        if self.n == 1:
            return f(self.median)
        return f"{f(self.median)} [{f(self.low)}-{f(self.high)}]"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), ``q`` in [0, 1]."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float:
    """Prometheus' ``histogram_quantile``: cumulative ``(le, count)`` buckets, linear inside a
    bucket; a quantile in the +Inf bucket is reported as the highest finite bound."""
    finite = [(le, n) for le, n in buckets if math.isfinite(le)]
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    prev_le, prev_n = 0.0, 0.0
    for le, n in finite:
        if n >= rank:
            if n == prev_n:
                return le
            return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
        prev_le, prev_n = le, n
    return finite[-1][0] if finite else math.nan


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Per-run-pair ratios (run i with run i)."""
    return [a / b for a, b in zip(numerators, denominators, strict=False) if b]


def render_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [cells[0].ljust(widths[0])]
        parts += [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "-" * len(line(["" for _ in headers]).ljust(sum(widths) + 2 * (len(widths) - 1)))
    out = [title, rule, line(headers), rule]
    out += [line(r) for r in rows]
    out.append(rule)
    return "\n".join(out)
