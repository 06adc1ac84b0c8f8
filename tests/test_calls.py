"""The per-event machinery of the dispatcher's hot path: handler calls (timeout per call, log
context), batched histogram observation, and a claim whose plan stays cheap on a long backlog."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
import structlog
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from sqlalchemy.ext.asyncio import AsyncSession

from pgreact import Event, Router
from pgreact.calls import HandlerCalls
from pgreact.logging import configure_logging, merge_handling
from pgreact.metrics import LAG_BUCKETS, observe_many
from pgreact.router import DurableHandler
from pgreact.store import Store
from tests.support import queue_for_noop_handler, sql

pytestmark = pytest.mark.anyio

NO_SESSION = AsyncSession()  # unbound: these handlers never touch the database


def event(n: int) -> Event:
    return Event(n, "public.source", "INSERT", str(n), {"id": n}, None, datetime.now(UTC), 1)


def only_handler(router: Router) -> DurableHandler:
    (handler,) = router.durable
    return handler


def test_observe_many_matches_observe() -> None:
    values = [0.0, 0.0005, 0.001, 0.0011, 0.3, 1.0, 7.5, 299.0, 5000.0, 0.02] * 3
    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("lag_seconds", "x", ["handler"], buckets=LAG_BUCKETS, registry=one)
    h2 = Histogram("lag_seconds", "x", ["handler"], buckets=LAG_BUCKETS, registry=many)
    for value in values:
        h1.labels("h").observe(value)
    observe_many(h2.labels("h"), values)

    def samples(registry: CollectorRegistry) -> str:
        text = generate_latest(registry).decode()
        return re.sub(r"^lag_seconds_created.*$", "", text, flags=re.MULTILINE)

    assert samples(one) == samples(many)
    assert 'lag_seconds_bucket{handler="h",le="0.001"} 9.0' in samples(many)


async def test_timeout_applies_to_each_call_not_to_the_batch() -> None:
    router = Router()
    seen: list[int] = []

    @router.on("public.source", name="slowish")
    async def slowish(e: Event, _session: AsyncSession) -> None:
        # Each call well within the 1 s limit (a loaded machine may add tenths of a second),
        # all three together not.
        await anyio.sleep(0.4)
        seen.append(e.id)

    calls = HandlerCalls(only_handler(router), timeout=1.0)
    await calls.run([event(1), event(2), event(3)], NO_SESSION)
    assert seen == [1, 2, 3]
    assert len(calls.durations) == 3


async def test_a_hung_call_is_cancelled_and_named() -> None:
    router = Router()

    @router.on("public.source", name="hangs_on_two")
    async def hangs_on_two(e: Event, _session: AsyncSession) -> None:
        if e.id == 2:
            await anyio.sleep(30)

    calls = HandlerCalls(only_handler(router), timeout=0.1)
    with anyio.fail_after(5), pytest.raises(TimeoutError):
        await calls.run([event(1), event(2), event(3)], NO_SESSION)
    assert calls.current == 1  # the second event's call hung
    assert len(calls.durations) == 2


async def test_handler_log_lines_carry_the_event() -> None:
    saved = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    lines: list[dict[str, Any]] = []

    def capture(_logger: Any, _method: str, event_dict: Any) -> Any:
        lines.append(dict(event_dict))
        raise structlog.DropEvent

    try:
        configure_logging("json", "INFO", cache=False)
        processors = structlog.get_config()["processors"]
        assert merge_handling in processors
        structlog.configure(processors=[*processors[:-1], capture])
        router = Router()

        @router.on("public.source", name="chatty")
        async def chatty(e: Event, _session: AsyncSession) -> None:
            structlog.get_logger("user").info("hello", n=e.id)

        @router.on_batch("public.source", name="chatty_batch")
        async def chatty_batch(events: Sequence[Event], _session: AsyncSession) -> None:
            structlog.get_logger("user").info("batch", size=len(events))

        single, batch = router.durable
        await HandlerCalls(single, 1).run([event(7)], NO_SESSION)
        await HandlerCalls(batch, 1).run([event(8), event(9)], NO_SESSION)
        structlog.get_logger("user").info("outside")
    finally:
        structlog.configure(**saved)
        root.handlers[:], root.level = saved_handlers, saved_level
    by_event = {line["event"]: line for line in lines}
    assert by_event["hello"] | {"timestamp": None} == {
        "event": "hello",
        "n": 7,
        "handler": "chatty",
        "table": "public.source",
        "event_id": 7,
        "op": "INSERT",
        "attempt": 1,
        "level": "info",
        "timestamp": None,
    }
    assert by_event["batch"]["handler"] == "chatty_batch"
    assert "event_id" not in by_event["batch"]
    assert "handler" not in by_event["outside"]


async def test_claim_stays_cheap_on_a_long_backlog(pg_dsn: str, sa_url: str) -> None:
    """A claim must not scan the backlog (it once looked for 'suspects' through every queued
    row) nor be costed high enough for the server to JIT-compile it on every call."""
    await queue_for_noop_handler(pg_dsn, sa_url, 20000)
    sql(pg_dsn, "ANALYZE pgreact.queue")
    claim = Store("pgreact")._claim.sql
    names: list[str] = []

    def placeholder(match: re.Match[str]) -> str:
        names.append(match.group(1))
        return f"%({match.group(1)})s"

    statement = re.sub(r"(?<!:):(\w+)", placeholder, claim)
    params: dict[str, Any] = {
        "handler": "h",
        "limit": 100,
        "suspects": 1,
        "owner": 1,
        "token": 1,
        "lease": 60.0,
    }
    plan = sql(pg_dsn, f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", params)[0][0][0]
    assert plan["Plan"]["Total Cost"] < 100_000  # jit_above_cost's default
    assert "JIT" not in plan

    def scanned(node: dict[str, Any]) -> int:
        own = int(node.get("Rows Removed by Filter", 0)) + int(node.get("Actual Rows", 0))
        return own + sum(scanned(child) for child in node.get("Plans", []))

    assert scanned(plan["Plan"]) < 2_000  # 100 claimed, not 20,000 looked at
    assert sql(pg_dsn, "SELECT count(*) FROM pgreact.queue WHERE claim_token = 1")[0][0] == 100
