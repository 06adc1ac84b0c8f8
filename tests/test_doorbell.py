"""The doorbell's signed rings: firm wake-ups nobody else can send, for both drivers."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from pgreact.dispatcher import Dispatcher
from pgreact.doorbell import RingVerifier, load_verifier, ring_mac
from tests.handlers.effects import router
from tests.support import create_tables, install, make_settings, running, sql, wait_until

SECRET = "k" * 72


def signed(seq: int, table: str = "public.orders", secret: str = SECRET) -> str:
    return f"ring/{seq}/{ring_mac(secret, seq)}/{table}"


def test_a_signed_ring_is_firm_once() -> None:
    rings = RingVerifier(SECRET)
    for seq in (7, 8, 6):  # rings may commit out of their sequence's order
        first = rings.classify(signed(seq))
        assert (first.table, first.firm) == ("public.orders", True)
    replayed = rings.classify(signed(7))
    assert (replayed.table, replayed.firm) == ("public.orders", False)


def test_anything_else_is_a_hint() -> None:
    rings = RingVerifier(SECRET)
    forged = rings.classify(signed(9, secret="guess"))
    assert (forged.table, forged.firm) == ("public.orders", False)
    for payload, table in [("public.orders", "public.orders"), ("", None), ("ring/x/y/z", None)]:
        wake = rings.classify(payload)
        assert (wake.table, wake.firm) == (table, False)
    assert rings.classify("ring/1/2").firm is False


def test_without_the_key_every_notification_is_firm() -> None:
    rings = RingVerifier(None)
    assert rings.classify("public.orders").firm
    assert rings.classify(signed(3)).firm


def test_a_table_name_with_slashes_survives() -> None:
    wake = RingVerifier(SECRET).classify(signed(4, table='public."a/b"'))
    assert (wake.table, wake.firm) == ('public."a/b"', True)


@pytest.mark.anyio
async def test_a_captured_change_rings_firm_and_a_forged_notify_does_not(
    pg_dsn: str, sa_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_tables(pg_dsn)
    await install(sa_url, router)
    engine = create_async_engine(sa_url)
    try:
        assert (await load_verifier(engine, "pgreact")).secret
    finally:
        await engine.dispose()
    wakes: list[tuple[Any, bool]] = []
    wake = Dispatcher.wake

    def recorded(self: Dispatcher, table: str | None = None, *, hint: bool = False) -> None:
        wakes.append((table, hint))
        wake(self, table, hint=hint)

    monkeypatch.setattr(Dispatcher, "wake", recorded)
    async with running(make_settings(sa_url, sweep_interval=3600), router) as daemon:
        connected = daemon.metrics.registry.get_sample_value
        await wait_until(lambda: connected("pgreact_listener_connected") == 1)
        await wait_until(lambda: sql(pg_dsn, "SELECT armed FROM pgreact.doorbell") == [(True,)])
        sql(pg_dsn, "NOTIFY pgreact_events, 'public.source'")
        await wait_until(lambda: ("public.source", True) in wakes, message="the forged hint")
        sql(pg_dsn, "INSERT INTO source VALUES (1, 1)")
        await wait_until(lambda: ("public.source", False) in wakes, message="the signed ring")
