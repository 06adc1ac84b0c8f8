"""Every Prometheus metric pgreact exports, declared in one place.

Names follow the contract (base units, ``_total`` counters, ``_seconds``); labels are bounded:
handler names come from code, channels from the LISTEN set, outcomes and states are fixed.
Each daemon gets its own registry, so several daemons can run in one test process. Besides
pgreact's own series, each registry carries the client's process (``process_*``) and platform
(``python_info``) collectors; no ``*_created`` series are exported.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# `*_created` doubles the series of every counter and histogram and no dashboard or alert of
# pgreact reads it (rates and increase() do not need it). Process-wide, as the client allows.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Handler calls range from sub-millisecond to the 30 s timeout; lag adds queueing and retries.
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)
LAG_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    3600,
)

OUTCOMES = ("ok", "retry", "dead")


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    checked_out: int
    idle: int
    overflow: int


class _PoolCollector(Collector):
    """Reads the SQLAlchemy pool at scrape time: no stale numbers, no polling task."""

    def __init__(self, read: Callable[[], PoolSnapshot | None]) -> None:
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "pgreact_db_pool_connections",
            "Connections of the write pool by state.",
            labels=["state"],
        )
        snap = self._read()
        if snap is not None:
            family.add_metric(["checked_out"], snap.checked_out)
            family.add_metric(["idle"], snap.idle)
            family.add_metric(["overflow"], snap.overflow)
        yield family


class _HistogramChild:
    """One label set of a :class:`BatchHistogram`: bucket counts (not cumulative) and a sum."""

    __slots__ = ("_bounds", "_counts", "_lock", "_sum")

    def __init__(self, bounds: Sequence[float], lock: threading.Lock) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = lock

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self._bounds, value)  # the first bound >= value, as `le`
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def observe_many(self, values: Sequence[float]) -> None:
        bounds = self._bounds
        indexes = [bisect.bisect_left(bounds, v) for v in values]
        total = math.fsum(values)
        with self._lock:
            counts = self._counts
            for index in indexes:
                counts[index] += 1
            self._sum += total

    def snapshot(self) -> tuple[list[int], float]:
        with self._lock:
            return list(self._counts), self._sum


class BatchHistogram(Collector):
    """A labelled histogram whose children also take many observations at once.

    The dispatcher observes every event's lag and every call's duration: through
    ``Histogram.observe`` that cost more than the rest of handling a batch event (a lock and a
    scan of the bounds per value). Here a batch is bucketed first and added under one lock, and
    the result is exported through the client's public collector API (``HistogramMetricFamily``),
    in the same exposition as a ``prometheus_client.Histogram`` of the same name.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry | None = None,
    ) -> None:
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds:
            raise ValueError("a histogram needs at least one finite bucket bound")
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = bounds
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], _HistogramChild] = {}
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> _HistogramChild:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, _HistogramChild(self._bounds, self._lock))
        return child

    def describe(self) -> Iterable[HistogramMetricFamily]:
        yield HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterable[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        for key, child in sorted(self._children.items()):
            counts, total = child.snapshot()
            cumulative, running = [], 0
            for le, count in zip(les, counts, strict=True):
                running += count
                cumulative.append((le, float(running)))
            family.add_metric(list(key), cumulative, sum_value=total)
        yield family


def observe_many(histogram: Any, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for every value: at once for a :class:`BatchHistogram` child,
    one by one for anything else with a public ``observe`` (a ``prometheus_client`` child)."""
    if isinstance(histogram, _HistogramChild):
        histogram.observe_many(values)
        return
    for value in values:
        histogram.observe(value)


@dataclass(frozen=True, slots=True)
class HandlerMetrics:
    """One durable handler's labelled series, looked up once instead of per event."""

    ok: Any
    retry: Any
    dead: Any
    duration: Any
    lag: Any
    lease_conflicts: Any
    transient_errors: Any


class Metrics:
    """The daemon's metrics, bound to one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.notifications_received = Counter(
            "pgreact_notifications_received",
            "NOTIFY messages received, by channel.",
            ["channel"],
            registry=r,
        )
        self.events_handled = Counter(
            "pgreact_events_handled",
            "Events handled, by handler and outcome (ok, retry scheduled, dead-lettered).",
            ["handler", "outcome"],
            registry=r,
        )
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.handler_duration = BatchHistogram(
            "pgreact_handler_duration_seconds",
            "Duration of one handler call.",
            ["handler"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.event_lag = BatchHistogram(
            "pgreact_event_lag_seconds",
            "Time from capture to the commit that marked the event done.",
            ["handler"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.events_pending = Gauge(
            "pgreact_events_pending",
            "Live events per handler (database-wide).",
            ["handler"],
            registry=r,
        )
        self.events_waiting_retry = Gauge(
            "pgreact_events_waiting_retry",
            "Live events per handler whose next attempt is not due yet (database-wide): part of"
            " pgreact_events_pending that no added replica could run now.",
            ["handler"],
            registry=r,
        )
        self.oldest_pending_age = Gauge(
            "pgreact_oldest_pending_age_seconds",
            "Age of the oldest live event per handler (database-wide).",
            ["handler"],
            registry=r,
        )
        self.events_dead = Gauge(
            "pgreact_events_dead",
            "Dead-lettered events per handler (database-wide).",
            ["handler"],
            registry=r,
        )
        self.listener_connected = Gauge(
            "pgreact_listener_connected",
            "1 while the LISTEN connection is up.",
            registry=r,
        )
        self.listener_reconnects = Counter(
            "pgreact_listener_reconnects",
            "Times the LISTEN connection was re-established.",
            registry=r,
        )
        self.notify_queue_usage = Gauge(
            "pgreact_notify_queue_usage",
            "pg_notification_queue_usage(): fraction of the server's NOTIFY queue in use.",
            registry=r,
        )
        self.build_info = Gauge(
            "pgreact_build_info",
            "Build and runtime information (always 1).",
            ["version", "listener", "driver"],
            registry=r,
        )
        # Beyond the contract: what an operator needs to explain the numbers above.
        self.capture_broken = Gauge(
            "pgreact_capture_broken",
            "1 while a handler's table is gone, renamed or lacks pgreact's capture triggers, so"
            " its changes are not captured (pgreact check says what to do).",
            ["handler"],
            registry=r,
        )
        self.notifications_dropped = Counter(
            "pgreact_notifications_dropped",
            "Notifications for on_notify handlers dropped because their queue was full.",
            ["channel"],
            registry=r,
        )
        self.claims_reaped = Counter(
            "pgreact_claims_reaped",
            "Claims taken back from processes that stopped or lost them.",
            ["handler"],
            registry=r,
        )
        self.lease_conflicts = Counter(
            "pgreact_lease_conflicts",
            "Transactions rolled back because another process had taken over their events.",
            ["handler"],
            registry=r,
        )
        self.transient_errors = Counter(
            "pgreact_transient_errors",
            "Database errors retried without spending an attempt (connection, serialization).",
            ["handler"],
            registry=r,
        )

    def for_handler(self, handler: str) -> HandlerMetrics:
        return HandlerMetrics(
            ok=self.events_handled.labels(handler, "ok"),
            retry=self.events_handled.labels(handler, "retry"),
            dead=self.events_handled.labels(handler, "dead"),
            duration=self.handler_duration.labels(handler),
            lag=self.event_lag.labels(handler),
            lease_conflicts=self.lease_conflicts.labels(handler),
            transient_errors=self.transient_errors.labels(handler),
        )

    def observe_pool(self, read: Callable[[], PoolSnapshot | None]) -> None:
        self.registry.register(_PoolCollector(read))

    def prime_handler(self, handler: str) -> None:
        """Create every labelled series of a handler at zero, so rates exist from the start."""
        for outcome in OUTCOMES:
            self.events_handled.labels(handler, outcome)
        self.handler_duration.labels(handler)
        self.event_lag.labels(handler)
        self.events_pending.labels(handler).set(0)
        self.events_waiting_retry.labels(handler).set(0)
        self.capture_broken.labels(handler).set(0)
        self.claims_reaped.labels(handler)
        self.oldest_pending_age.labels(handler).set(0)
        self.events_dead.labels(handler).set(0)
