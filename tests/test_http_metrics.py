"""The HTTP surface as a scraper sees it (prometheus-client's ASGI app behind Hypercorn) and the
batch histogram behind the lag and duration metrics. No database: the metrics are the daemon's
own, the readiness probe is a stub."""

from __future__ import annotations

import gzip
import random
import re
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from pgreact.errors import HttpBindError, PgreactError
from pgreact.http import HealthApp, serve_http
from pgreact.metrics import DURATION_BUCKETS, LAG_BUCKETS, BatchHistogram, Metrics, observe_many

pytestmark = pytest.mark.anyio

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


async def _ready() -> dict[str, str]:
    return {}


@asynccontextmanager
async def serving(metrics: Metrics) -> AsyncIterator[str]:
    shutdown = anyio.Event()
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            serve_http, HealthApp(metrics.registry, _ready), "127.0.0.1", 0, shutdown
        )
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            shutdown.set()


def busy_metrics() -> Metrics:
    metrics = Metrics()
    metrics.prime_handler("h")
    metrics.events_handled.labels("h", "ok").inc(3)
    observe_many(metrics.for_handler("h").lag, [0.01, 0.2, 7.0])
    return metrics


async def test_metrics_default_text_format_with_process_series_and_no_created() -> None:
    async with serving(busy_metrics()) as base, httpx.AsyncClient() as client:
        response = await client.get(f"{base}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    assert 'pgreact_events_handled_total{handler="h",outcome="ok"} 3.0' in text
    assert 'pgreact_event_lag_seconds_count{handler="h"} 3.0' in text
    assert "python_info{" in text  # the platform collector
    if sys.platform == "linux":
        for series in ("process_cpu_seconds_total", "process_resident_memory_bytes"):
            assert re.search(rf"^{series} ", text, re.MULTILINE), series
    assert "_created" not in text


async def test_metrics_openmetrics_when_asked_and_gzip_when_accepted() -> None:
    async with serving(busy_metrics()) as base, httpx.AsyncClient() as client:
        om = await client.get(
            f"{base}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        zipped = await client.get(f"{base}/metrics", headers={"Accept-Encoding": "gzip"})
        request = client.build_request(
            "GET", f"{base}/metrics", headers={"Accept-Encoding": "gzip"}
        )
        raw = await client.send(request, stream=True)
        body = b"".join([chunk async for chunk in raw.aiter_raw()])  # as sent, not decoded
        await raw.aclose()
    assert om.status_code == 200
    assert om.headers["content-type"].startswith(OPENMETRICS)
    assert om.text.rstrip().endswith("# EOF")
    assert 'pgreact_events_handled_total{handler="h",outcome="ok"} 3.0' in om.text
    assert "_created" not in om.text
    assert zipped.headers["content-encoding"] == "gzip"
    assert "pgreact_event_lag_seconds_bucket" in zipped.text  # httpx decoded it
    assert b"pgreact_event_lag_seconds_bucket" in gzip.decompress(body)


async def test_probes_still_answer_next_to_metrics() -> None:
    async with serving(Metrics()) as base, httpx.AsyncClient() as client:
        live = await client.get(f"{base}/livez")
        ready = await client.get(f"{base}/readyz")
        missing = await client.get(f"{base}/nope")
    assert (live.status_code, ready.status_code, missing.status_code) == (200, 200, 404)
    assert ready.json() == {"status": "ready", "down": {}}


# -- the batch histogram ----------------------------------------------------------------------


@pytest.mark.parametrize("buckets", [LAG_BUCKETS, DURATION_BUCKETS])
def test_batch_histogram_exports_what_a_client_histogram_would(
    buckets: tuple[float, ...],
) -> None:
    rng = random.Random(7)
    values = [rng.choice([0.0, *buckets, 1e6]) for _ in range(50)]
    values += [rng.uniform(0, 400) for _ in range(200)]
    reference, ours = CollectorRegistry(), CollectorRegistry()
    client = Histogram("x_seconds", "doc", ["handler"], buckets=buckets, registry=reference)
    batch = BatchHistogram("x_seconds", "doc", ["handler"], buckets=buckets, registry=ours)
    for value in values:
        client.labels("a").observe(value)
    client.labels("b")
    observe_many(batch.labels("a"), values[:100])
    for value in values[100:]:
        batch.labels("a").observe(value)
    batch.labels("b")

    def exposition(registry: CollectorRegistry) -> str:
        text = generate_latest(registry).decode()
        # the sum is added in another order: compare it to 9 significant digits
        return re.sub(r"(_sum\{[^}]*\}) (\S+)", lambda m: f"{m[1]} {float(m[2]):.9g}", text)

    assert exposition(ours) == exposition(reference)


def test_batch_histogram_rejects_wrong_label_counts() -> None:
    histogram = BatchHistogram("y_seconds", "doc", ["handler"], buckets=(1.0,))
    with pytest.raises(ValueError, match="handler"):
        histogram.labels("a", "b")


# -- where it cannot listen -------------------------------------------------------------------


async def test_port_in_use_and_bad_host_are_one_line_errors() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    app = HealthApp(Metrics().registry, _ready)
    try:
        with pytest.raises(HttpBindError) as in_use:
            await serve_http(app, "127.0.0.1", port, anyio.Event())
    finally:
        holder.close()
    message = str(in_use.value)
    assert f"127.0.0.1:{port}" in message
    assert "PGREACT_HTTP_PORT" in message and "in use" in message
    assert isinstance(in_use.value, PgreactError) and in_use.value.exit_code == 1
    with pytest.raises(HttpBindError, match="PGREACT_HTTP_HOST"):
        await serve_http(app, "no-such-host.invalid", 0, anyio.Event())
