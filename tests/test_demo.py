"""``pgreact demo``: the pieces it checks with, the demo in process against both drivers, and the
real CLI (embedded server; Ctrl-C)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from pgreact.demo import (
    CheckResult,
    ProducerStats,
    Report,
    check_derived,
    histogram_quantile,
    pick_http_port,
    run_demo,
)
from pgreact.demo_handlers import (
    AUDIT_HANDLER,
    DEMO_SCHEMA,
    SCHEMA_DDL,
    TOTALS_HANDLER,
    is_flaky,
    line_deltas,
)
from pgreact.errors import ConfigError
from pgreact.events import Event, Op
from tests.support import ROOT, libpq, sql

S = DEMO_SCHEMA
# Settings and paths that may stay in the environment of a demo run; every other PGREACT_*
# variable is removed so the developer's own configuration cannot leak into the tests.
KEEP_ENV = ("PGREACT_TMPDIR", "PGREACT_CACHE_DIR")


def _demo_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PGREACT_") or k in KEEP_ENV or k.startswith("PGREACT_TEST_")
    }
    env["PYTHONPATH"] = str(ROOT)
    return {**env, **extra}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if (
            key.startswith("PGREACT_")
            and key not in KEEP_ENV
            and not key.startswith("PGREACT_TEST_")
        ):
            monkeypatch.delenv(key)


def _event(op: Op, new: dict[str, Any] | None, old: dict[str, Any] | None, eid: int = 1) -> Event:
    return Event(
        id=eid,
        table=f"{S}.order_lines",
        op=op,
        key=None,
        new=new,
        old=old,
        created_at=datetime.now(UTC),
        attempt=1,
    )


def _line(order_id: int, qty: int, price: float) -> dict[str, Any]:
    # Row images decode numeric as float, as the handler receives them.
    return {"id": 1, "order_id": order_id, "sku": "SKU-1", "qty": qty, "unit_price": price}


# -- pure pieces ------------------------------------------------------------------------------


def test_line_deltas_apply_every_operation_as_old_out_new_in() -> None:
    events = [
        _event("INSERT", _line(1, 2, 10.05), None),
        _event("INSERT", _line(1, 1, 0.1), None),
        _event("UPDATE", _line(1, 3, 10.05), _line(1, 2, 10.05)),  # qty 2 → 3
        _event("DELETE", None, _line(1, 1, 0.1)),
        _event("UPDATE", _line(3, 1, 5.0), _line(2, 1, 5.0)),  # moved to another order
        _event("INSERT", _line(4, 1, 1.0), None),
        _event("DELETE", None, _line(4, 1, 1.0)),  # nets out: no row to write at all
    ]
    assert line_deltas(events) == {
        1: (1, Decimal("30.15")),
        2: (-1, Decimal("-5.00")),
        3: (1, Decimal("5.00")),
    }
    # Deltas commute: the result does not depend on the order of the batch.
    assert line_deltas(list(reversed(events))) == line_deltas(events)


def test_money_survives_the_float_round_trip_exactly() -> None:
    price = 12345678.91  # numeric(10,2)'s largest magnitude: 10 significant digits
    assert line_deltas([_event("INSERT", _line(1, 3, price), None)]) == {
        1: (1, Decimal("37037036.73"))
    }


def test_about_one_percent_of_events_are_flaky_and_always_the_same_ones() -> None:
    flaky = [i for i in range(1, 20_001) if is_flaky(i)]
    assert 100 < len(flaky) < 300
    assert flaky == [i for i in range(1, 20_001) if is_flaky(i)]


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    inf = float("inf")
    assert histogram_quantile(0.5, []) is None
    assert histogram_quantile(0.5, [(0.1, 0), (inf, 0)]) is None
    # 10 observations: 4 at or below 0.01 s, 10 at or below 0.1 s → the median is in (0.01, 0.1].
    median = histogram_quantile(0.5, [(0.01, 4), (0.1, 10), (inf, 10)])
    assert median == pytest.approx(0.01 + 0.09 * (5 - 4) / (10 - 4))
    # Beyond the largest finite bound, that bound is the best estimate.
    assert histogram_quantile(0.5, [(0.01, 0), (0.1, 0), (inf, 3)]) == 0.1


def test_a_busy_port_falls_back_to_any_free_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert pick_http_port("127.0.0.1", port) == (0, f"port {port} is busy")
    assert pick_http_port("127.0.0.1", 0) == (0, None)


def _checks(**changes: int) -> CheckResult:
    values = {
        "orders": 10,
        "lines": 25,
        "totals_mismatches": 0,
        "audit_rows": 14,
        "audit_expected": 14,
        "audit_duplicates": 0,
        "audit_chain_breaks": 0,
        "audit_stale_orders": 0,
    }
    return CheckResult(**{**values, **changes})


def _report(checks: CheckResult, *, dead: int = 0, backlog: int = 0, audit_ok: int = 14) -> Report:
    produced = ProducerStats(
        orders=10, lines_inserted=27, status_updates=4, qty_updates=3, lines_deleted=2
    )
    return Report.build(
        seconds=2.0,
        target_rate=5.0,
        produced=produced,
        checks=checks,
        handled={TOTALS_HANDLER: 32, AUDIT_HANDLER: audit_ok},
        retries=1,
        dead=dead,
        backlog=backlog,
    )


def test_the_report_passes_only_when_everything_matches() -> None:
    good = _report(_checks())
    assert good.ok
    assert good.render().splitlines()[-1] == "RESULT: PASS"
    assert "FAIL" not in good.render()
    for bad in (
        _report(_checks(totals_mismatches=1)),
        _report(_checks(audit_rows=13)),
        _report(_checks(audit_duplicates=1)),
        _report(_checks(orders=9)),
        _report(_checks(), dead=1),
        _report(_checks(), backlog=3),
        _report(_checks(), audit_ok=13),  # an event handled fewer times than produced
    ):
        assert not bad.ok
        assert bad.render().splitlines()[-1].startswith("RESULT: FAIL (1 of")


# -- the checking function against a real database ----------------------------------------------


def _create_demo_schema(dsn: str) -> None:
    for statement in SCHEMA_DDL:
        sql(dsn, statement)


def _seed_consistent(dsn: str) -> None:
    """Three orders as the handlers would leave them: one with two lines (one qty changed),
    one whose only line was deleted (a zero row), one with no line ever (no row)."""
    sql(
        dsn,
        f"""INSERT INTO {S}.orders (id, customer, status) VALUES
            (1, 'ada', 'paid'), (2, 'ken', 'new'), (3, 'grace', 'new')""",
    )
    sql(
        dsn,
        f"""INSERT INTO {S}.order_lines (order_id, sku, qty, unit_price) VALUES
            (1, 'A', 3, 9.99), (1, 'B', 1, 0.01)""",
    )
    sql(
        dsn,
        f"""INSERT INTO {S}.order_totals (order_id, line_count, total) VALUES
            (1, 2, 29.98), (2, 0, 0)""",
    )
    sql(
        dsn,
        f"""INSERT INTO {S}.audit_log (event_id, order_id, old_status, new_status) VALUES
            (10, 1, NULL, 'new'), (11, 2, NULL, 'new'), (12, 3, NULL, 'new'),
            (13, 1, 'new', 'paid')""",
    )


async def _check(sa_url: str, expected_audit_rows: int) -> CheckResult:
    engine = create_async_engine(sa_url)
    try:
        async with engine.connect() as conn:
            return await check_derived(conn, expected_audit_rows)
    finally:
        await engine.dispose()


@pytest.mark.anyio
async def test_check_derived_finds_each_kind_of_corruption(pg_dsn: str, sa_url: str) -> None:
    _create_demo_schema(pg_dsn)
    _seed_consistent(pg_dsn)
    clean = await _check(sa_url, 4)
    assert clean.ok, clean
    assert (clean.orders, clean.lines, clean.audit_rows) == (3, 2, 4)

    sql(pg_dsn, f"UPDATE {S}.order_totals SET total = total + 0.01 WHERE order_id = 1")
    corrupt = await _check(sa_url, 4)
    assert corrupt.totals_mismatches == 1
    assert not corrupt.ok
    sql(pg_dsn, f"UPDATE {S}.order_totals SET total = total - 0.01 WHERE order_id = 1")

    sql(pg_dsn, f"UPDATE {S}.order_totals SET line_count = 1 WHERE order_id = 2")
    assert (await _check(sa_url, 4)).totals_mismatches == 1  # a non-zero row without lines
    sql(pg_dsn, f"DELETE FROM {S}.order_totals WHERE order_id = 2")
    assert (await _check(sa_url, 4)).ok  # ... while no row at all is fine

    sql(pg_dsn, f"DELETE FROM {S}.order_totals WHERE order_id = 1")
    assert (await _check(sa_url, 4)).totals_mismatches == 1  # lines but no totals row
    sql(pg_dsn, f"INSERT INTO {S}.order_totals VALUES (1, 2, 29.98), (99, 1, 1)")
    assert (await _check(sa_url, 4)).totals_mismatches == 1  # a row for an unknown order
    sql(pg_dsn, f"DELETE FROM {S}.order_totals WHERE order_id = 99")

    # The audit log: a change recorded twice, a change missing, changes out of order.
    sql(
        pg_dsn,
        f"INSERT INTO {S}.audit_log (event_id, order_id, old_status, new_status) "
        "VALUES (13, 1, 'new', 'paid')",
    )
    doubled = await _check(sa_url, 4)
    assert doubled.audit_duplicates == 1
    assert doubled.audit_chain_breaks == 1  # 'new' after 'paid' breaks the chain too
    assert doubled.audit_mismatches == 3  # one row too many, one duplicate, one break
    sql(pg_dsn, f"DELETE FROM {S}.audit_log WHERE id = (SELECT max(id) FROM {S}.audit_log)")
    assert (await _check(sa_url, 4)).ok
    assert (await _check(sa_url, 5)).audit_mismatches == 1  # the producer counted one more

    sql(pg_dsn, f"DELETE FROM {S}.audit_log WHERE event_id = 13")
    missing = await _check(sa_url, 4)
    assert missing.audit_stale_orders == 1  # order 1 is 'paid'; its log ends in 'new'
    assert missing.audit_mismatches == 2

    sql(
        pg_dsn,
        f"INSERT INTO {S}.audit_log (event_id, order_id, old_status, new_status) VALUES "
        "(15, 1, 'paid', 'shipped'), (14, 1, 'new', 'paid')",  # right events, wrong order
    )
    sql(pg_dsn, f"UPDATE {S}.orders SET status = 'shipped' WHERE id = 1")
    swapped = await _check(sa_url, 5)
    assert swapped.audit_chain_breaks == 2
    assert swapped.audit_stale_orders == 1
    assert not swapped.ok


@pytest.mark.anyio
@pytest.mark.usefixtures("clean_env")
async def test_demo_refuses_a_schema_it_did_not_create(
    pg_dsn: str, sa_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sql(pg_dsn, f"CREATE SCHEMA {S}")
    sql(pg_dsn, f"CREATE TABLE {S}.precious (id int)")
    monkeypatch.setenv("PGREACT_DATABASE_URL", sa_url)
    with pytest.raises(ConfigError, match="was not created by `pgreact demo`"):
        await run_demo(None, duration=1, rate=10, http_port=0, configure_logs=False)
    assert sql(pg_dsn, f"SELECT count(*) FROM {S}.precious") == [(0,)]


# -- the demo, in process ---------------------------------------------------------------------


def _verify_derived_tables(dsn: str, *, expect_deletes: bool = True) -> None:
    """The test's own look at the result, independent of the demo's checking code."""
    (mismatched,) = sql(
        dsn,
        f"""SELECT count(*) FROM {S}.orders o
            LEFT JOIN (SELECT order_id, count(*) AS n, sum(qty * unit_price) AS total
                       FROM {S}.order_lines GROUP BY order_id) l ON l.order_id = o.id
            LEFT JOIN {S}.order_totals t ON t.order_id = o.id
            WHERE coalesce(l.n, 0) <> coalesce(t.line_count, 0)
               OR coalesce(l.total, 0) <> coalesce(t.total, 0)""",
    )[0]
    assert mismatched == 0
    orders, inserts, updates, distinct_events, audit_rows = sql(
        dsn,
        f"""SELECT (SELECT count(*) FROM {S}.orders),
                   count(*) FILTER (WHERE old_status IS NULL),
                   count(*) FILTER (WHERE old_status IS NOT NULL),
                   count(DISTINCT event_id), count(*)
            FROM {S}.audit_log""",
    )[0]
    assert orders > 0
    assert inserts == orders  # one INSERT entry per order
    assert updates > 0  # status changes flowed
    assert distinct_events == audit_rows  # nothing recorded twice
    lines, max_line_id = sql(dsn, f"SELECT count(*), max(id) FROM {S}.order_lines")[0]
    if expect_deletes:  # a one-second run may happen to delete none (the mix is random)
        assert lines < max_line_id  # some lines were deleted
    assert sql(dsn, f"SELECT count(*) FROM {S}.queue") == [(0,)]  # everything handled


@pytest.mark.anyio
@pytest.mark.usefixtures("clean_env")
async def test_demo_in_process_passes_and_leaves_correct_derived_tables(
    pg_dsn: str, sa_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGREACT_DATABASE_URL", sa_url)
    out = io.StringIO()
    ok = await run_demo(None, duration=3, rate=60, http_port=0, configure_logs=False, out=out)
    text = out.getvalue()
    assert ok, text
    assert "RESULT: PASS" in text
    assert f"schema {DEMO_SCHEMA}" in text
    assert "/metrics" in text
    progress = [line for line in text.splitlines() if line.startswith("[")]
    assert len(progress) >= 2  # not a TTY: one line per second
    _verify_derived_tables(pg_dsn)

    # A second run on the same database starts from a clean demo schema.
    again = io.StringIO()
    assert await run_demo(None, duration=1, rate=30, http_port=0, configure_logs=False, out=again)
    _verify_derived_tables(pg_dsn, expect_deletes=False)


# -- the real command line --------------------------------------------------------------------


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("pgreact")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pgreact.cli"]


def test_cli_demo_on_an_embedded_server_exits_0_with_a_passing_summary() -> None:
    result = subprocess.run(
        [*_cli(), "demo", "--duration", "3", "--rate", "60", "--http-port", "0"],
        env=_demo_env(),
        capture_output=True,
        text=True,
        timeout=110,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "embedded PostgreSQL" in result.stdout
    assert "RESULT: PASS" in result.stdout
    assert "FAIL" not in result.stdout
    # The deliberate failures are counted, not logged: the terminal stays readable.
    assert "SimulatedFailure" not in result.stderr


@pytest.fixture
def process() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_demo_ctrl_c_stops_producing_then_drains_and_checks(
    pg_dsn: str, process: list[subprocess.Popen[str]]
) -> None:
    env = _demo_env(PGREACT_DATABASE_URL=pg_dsn.replace("postgresql://", "postgresql+psycopg://"))
    proc = subprocess.Popen(
        [*_cli(), "demo", "--duration", "0", "--rate", "60", "--http-port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    process.append(proc)
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while sum(line.startswith("[") for line in seen) < 2:  # two progress lines: producing
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "".join(seen)
        assert time.monotonic() < deadline, "".join(seen)
        seen.append(line)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=90)
    output = "".join(seen) + rest
    assert proc.returncode == 0, output + err
    assert "SIGINT: producing stopped" in output
    assert "RESULT: PASS" in output
    _verify_derived_tables(libpq(pg_dsn))
