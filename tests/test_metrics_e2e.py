"""End to end: the daemon's real metrics through a real Prometheus, for both drivers.

The daemon runs in process against the test server; a Prometheus (Debian package) on loopback
scrapes it every second, with the same target labels the PodMonitor gives in Kubernetes
(``job="pgreact"``, ``namespace``, ``pod``) and with the alert rules loaded, plus a fixed
kube-state-metrics exposition for the pods (restarts, readiness). After real changes, every
dashboard panel query, every alert expression and the KEDA query are evaluated through
Prometheus's HTTP API: each must parse, each panel query must return data, every rule must
evaluate healthily, and every metric :mod:`pgreact.metrics` declares must be scraped.
``promtool check metrics`` must find nothing to report in a scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import anyio
import httpx
import pytest
from conftest import DRIVERS
from sqlalchemy.ext.asyncio import AsyncSession

from pgreact import Event, Notification, Router
from pgreact.runtime import Daemon
from pgreact.settings import Settings
from tests.deploy_support.prometheus import (
    Prometheus,
    ScrapeTarget,
    finite_values,
    free_port,
    running_prometheus,
    static_exporter,
)
from tests.deploy_support.queries import (
    RULES,
    dashboard_queries,
    dashboard_variables,
    exported_metrics,
    keda_queries,
    rule_queries,
    substitute,
)
from tests.deploy_support.tools import require_tool, run_tool
from tests.support import create_tables, install, make_settings, running, sql, wait_until

pytestmark = pytest.mark.anyio

NAMESPACE = "pgreact"  # the prod overlay's namespace: the KEDA query runs unchanged
ROWS = 200
PICKY_FAILS = ROWS // 10  # rows whose v is a multiple of ten


@contextlib.asynccontextmanager
async def scraped_daemon(settings: Settings, router: Router) -> AsyncIterator[Daemon]:
    """``tests.support.running``, tolerating one known shutdown error so this module judges the
    metrics, not the shutdown: Hypercorn cancelled after serving requests raised
    ``asyncio.InvalidStateError`` (service/http.py; pinned by tests/test_process.py). Harmless
    once that is fixed."""
    try:
        async with running(settings, router) as daemon:
            yield daemon
    except* asyncio.InvalidStateError:
        pass


def e2e_router(prefix: str = "e2e") -> Router:
    """Handlers named ``<prefix>.copy`` etc.: one Prometheus serves both drivers' tests, so each
    test's series are told apart by handler (and pod)."""
    router = Router()

    @router.on("source", name=f"{prefix}.copy")
    async def copy(event: Event, session: AsyncSession) -> None:
        await anyio.sleep(0.001)

    @router.on_batch("source", name=f"{prefix}.batch", max_size=50)
    async def batch(events: Sequence[Event], session: AsyncSession) -> None:
        return None

    @router.on("source", name=f"{prefix}.picky", ops=("INSERT",))
    async def picky(event: Event, session: AsyncSession) -> None:
        if event.new is not None and event.new["v"] % 10 == 0:
            raise RuntimeError("picky refuses multiples of ten")

    @router.on_notify(f"{prefix}_notes", name=f"{prefix}.notes")
    async def notes(note: Notification) -> None:
        return None

    return router


@dataclass(frozen=True)
class E2EPrometheus:
    url: str
    ports: dict[str, int]  # the daemon's HTTP port, per driver


def pod_of(driver: str) -> str:
    return f"pgreact-{driver}-0"


@pytest.fixture(scope="module")
def e2e_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2EPrometheus]:
    """One Prometheus for the module, started before any daemon: it takes ~5 s to apply its
    targets, so each driver's daemon gets a port chosen now and comes up under it later."""
    binary = require_tool("prometheus")
    ports = {driver: free_port() for driver in DRIVERS}
    targets = [
        ScrapeTarget(
            job="pgreact",
            address=f"127.0.0.1:{port}",
            labels={"namespace": NAMESPACE, "pod": pod_of(driver)},
        )
        for driver, port in ports.items()
    ]
    workdir = tmp_path_factory.mktemp("prometheus")
    with static_exporter(_kube_state_metrics()) as ksm:
        # Its series carry their own namespace and pod, so the target gets no such labels.
        targets.append(ScrapeTarget(job="kube-state-metrics", address=ksm, labels={}))
        with running_prometheus(binary, workdir, targets, [RULES]) as url:
            yield E2EPrometheus(url, ports)


def _kube_state_metrics() -> str:
    """What kube-state-metrics reports for the test's pods: ready, never restarted."""
    lines = [
        "# TYPE kube_pod_container_status_restarts_total counter",
        *(
            f'kube_pod_container_status_restarts_total{{namespace="{NAMESPACE}",'
            f'pod="{pod_of(d)}",container="pgreact"}} 0'
            for d in DRIVERS
        ),
        "# TYPE kube_pod_status_ready gauge",
        *(
            f'kube_pod_status_ready{{namespace="{NAMESPACE}",pod="{pod_of(d)}",'
            f'condition="{c}"}} {int(c == "true")}'
            for d in DRIVERS
            for c in ("true", "false", "unknown")
        ),
    ]
    return "\n".join(lines) + "\n"


async def test_dashboard_alert_and_keda_queries_on_real_metrics(
    pg_dsn: str, sa_url: str, driver: str, e2e_prometheus: E2EPrometheus
) -> None:
    promtool = require_tool("promtool")
    create_tables(pg_dsn)
    prefix = f"e2e_{driver}"
    router = e2e_router(prefix)
    await install(sa_url, router)
    pod = pod_of(driver)
    port = e2e_prometheus.ports[driver]
    settings = make_settings(sa_url, max_attempts=2, http_port=port)
    async with scraped_daemon(settings, router), httpx.AsyncClient(timeout=5) as client:
        prom = Prometheus(e2e_prometheus.url, client)
        # A first scrape before any change, so counters have a zero sample to rise from.
        await wait_until(
            lambda: _has_data(prom, f'pgreact_build_info{{job="pgreact", pod="{pod}"}}'),
            timeout=30,
            message="first scrape",
        )
        sql(pg_dsn, f"INSERT INTO source SELECT g, g FROM generate_series(1, {ROWS}) g")
        sql(pg_dsn, "UPDATE source SET v = v + 1")
        sql(pg_dsn, f"NOTIFY {prefix}_notes, 'hello'")
        await _wait_for_traffic(prom, prefix)
        await _check_dashboard(prom, pod)
        await _check_rules_and_keda(prom, prefix)
        await _check_every_contract_metric_scraped(prom, pod)
        scrape = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert scrape.status_code == 200
    lint = await anyio.to_thread.run_sync(
        lambda: run_tool([promtool, "check", "metrics"], input=scrape.text)
    )
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, ""), "promtool check metrics"


async def _has_data(prom: Prometheus, expr: str) -> bool:
    return bool(await prom.query(expr))


async def _at_least(prom: Prometheus, expr: str, minimum: float) -> bool:
    value = await prom.value(expr)
    return value is not None and value >= minimum


async def _wait_for_traffic(prom: Prometheus, prefix: str) -> None:
    def handled(handler: str, outcome: str) -> str:
        return f'sum(pgreact_events_handled_total{{outcome="{outcome}", handler="{prefix}.{handler}"}})'

    expectations = {
        handled("copy", "ok"): 2 * ROWS,
        handled("batch", "ok"): 2 * ROWS,
        handled("picky", "ok"): ROWS - PICKY_FAILS,
        handled("picky", "dead"): PICKY_FAILS,
        f'max(pgreact_events_dead{{handler="{prefix}.picky"}})': PICKY_FAILS,
        f'sum(pgreact_notifications_received_total{{channel="{prefix}_notes"}})': 1,
    }
    for expr, minimum in expectations.items():

        async def reached(e: str = expr, m: float = minimum) -> bool:
            return await _at_least(prom, e, m)

        await wait_until(
            reached, timeout=30, interval=0.2, message=f"Prometheus to see {expr} >= {minimum}"
        )


async def _check_dashboard(prom: Prometheus, pod: str) -> None:
    variables = dashboard_variables()
    # The variables' own queries (label_values) must offer this namespace and pod.
    assert NAMESPACE in await prom.label_values("namespace", "pgreact_build_info")
    assert "label_values(pgreact_build_info, namespace)" in variables["namespace"]["definition"]
    assert pod in await prom.label_values("pod", f'pgreact_build_info{{namespace="{NAMESPACE}"}}')
    values = {"namespace": NAMESPACE, "pod": pod, "__rate_interval": "1m", "datasource": ""}
    queries = dashboard_queries()
    assert len(queries) >= 20

    async def without_data() -> list[str]:
        missing = []
        for query in queries:
            expr = substitute(query.expr, values)
            result = await prom.query(expr)  # raises on a parse or evaluation error
            if not finite_values(result):
                missing.append(f"{query.where}: {expr} -> {result}")
        return missing

    # A series born after the first scrape (a label value seen for the first time) needs two
    # samples before rate() has anything: allow up to 10 s of scrapes for that.
    for _ in range(20):
        no_data = await without_data()
        if not no_data:
            break
        await anyio.sleep(0.5)
    assert not no_data, "panel queries without data:\n" + "\n".join(no_data)


async def _check_rules_and_keda(prom: Prometheus, prefix: str) -> None:
    for query in rule_queries():
        await prom.query(query.expr)  # parses and evaluates
    for query in keda_queries():
        value = await prom.value(query.expr)
        assert value is not None and value >= 0, f"{query.where} returned no data: {query.expr}"

    async def all_evaluated() -> bool:
        rules = await prom.rules()
        return bool(rules) and all(not r["lastEvaluation"].startswith("0001") for r in rules)

    await wait_until(all_evaluated, timeout=10, interval=0.2, message="rule evaluation")
    rules = await prom.rules()
    assert len(rules) == len(rule_queries())
    unhealthy = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not unhealthy
    # The dead letters of <prefix>.picky put PgreactDeadLetters on its way to firing.

    async def dead_letter_alert() -> bool:
        return any(
            a["labels"]["alertname"] == "PgreactDeadLetters"
            and a["labels"].get("handler") == f"{prefix}.picky"
            and a["labels"].get("namespace") == NAMESPACE
            for a in await prom.alerts()
        )

    await wait_until(dead_letter_alert, timeout=10, interval=0.2, message="PgreactDeadLetters")


async def _check_every_contract_metric_scraped(prom: Prometheus, pod: str) -> None:
    names = set(await prom.label_values("__name__", f'{{job="pgreact", pod="{pod}"}}'))
    declared = set(exported_metrics())
    assert declared <= names, declared - names
