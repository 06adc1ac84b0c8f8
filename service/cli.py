"""``pgreact`` command line. Exit codes: 0 success, 1 runtime failure, 2 usage/configuration."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import anyio
import click
import orjson
import structlog

from pgreact.errors import PgreactError
from pgreact.settings import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from pgreact.store import Store

T = TypeVar("T")


class _State:
    config: Path | None = None


def _settings(ctx: click.Context, **overrides: Any) -> Settings:
    state: _State = ctx.ensure_object(_State)
    return load_settings(state.config, **{k: v for k, v in overrides.items() if v is not None})


def _run(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main`` on asyncio (uvloop when installed) and map our errors to exit codes."""
    try:
        return anyio.run(main, backend="asyncio", backend_options=_loop_options())
    except PgreactError as exc:
        _fail(exc)
    except BaseExceptionGroup as group:
        # A task group wraps what its tasks raise; our own errors still deserve a clear line.
        mine, _ = group.split(PgreactError)
        if mine is None:
            raise
        _fail(_first_leaf(mine))


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _fail(exc: BaseException) -> NoReturn:
    click.echo(f"pgreact: error: {exc}", err=True)
    sys.exit(exc.exit_code if isinstance(exc, PgreactError) else 1)


def _loop_options() -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML file whose settings override the PGREACT_* environment variables.",
)
@click.version_option(package_name="pgreact")
@click.pass_context
def cli(ctx: click.Context, config: Path | None) -> None:
    """pgreact: PostgreSQL table changes drive Python handlers."""
    ctx.ensure_object(_State).config = config


# -- run ------------------------------------------------------------------------------------


@cli.command()
@click.pass_context
def run(ctx: click.Context) -> None:
    """Run the daemon until SIGTERM/SIGINT, then drain and exit 0."""
    from pgreact.logging import configure_logging
    from pgreact.router import load_routers
    from pgreact.runtime import Daemon

    def prepare() -> tuple[Settings, Any]:
        settings = _settings(ctx)
        settings.require_database_url()
        return settings, load_routers(settings.require_handlers())

    try:
        settings, router = prepare()
    except PgreactError as exc:
        click.echo(f"pgreact: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    configure_logging(settings.log_format, settings.log_level)
    log = structlog.get_logger("pgreact.cli")

    async def main() -> None:
        daemon = Daemon(settings, router)
        async with anyio.create_task_group() as tg:

            async def on_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("signal_received", signal=signal.Signals(signum).name)
                        daemon.stop()

            tg.start_soon(on_signals)
            await daemon.run()
            tg.cancel_scope.cancel()

    try:
        _run(main)
    except PgreactError as exc:  # pragma: no cover - _run exits
        log.error("fatal", error=str(exc))
        sys.exit(exc.exit_code)


# -- install ----------------------------------------------------------------------------------


@cli.command()
@click.option("--print-sql", is_flag=True, help="Print the DDL instead of applying it.")
@click.option("--prune", is_flag=True, help="Remove capture from tables no longer handled.")
@click.pass_context
def install(ctx: click.Context, print_sql: bool, prune: bool) -> None:
    """Create or upgrade pgreact's schema and the capture triggers (idempotent)."""
    from pgreact import installer
    from pgreact.db import create_write_engine
    from pgreact.router import load_routers

    settings = _load(ctx)

    async def main() -> None:
        router = load_routers(settings.require_handlers())
        engine = create_write_engine(settings)
        try:
            if print_sql:
                async with engine.connect() as conn:
                    plan = await installer.plan(conn, router, settings.schema_name, prune=prune)
                click.echo(plan.sql, nl=False)
            else:
                plan = await installer.install(engine, router, settings.schema_name, prune=prune)
                click.echo(
                    f"pgreact: schema {settings.schema_name!r} at version {plan.to_version}; "
                    f"{len(router.durable)} handler(s) on "
                    f"{len({h.table for h in router.durable})} table(s) installed",
                    err=True,
                )
            for note in plan.notes:
                click.echo(f"pgreact: note: {note}", err=True)
        except Exception as exc:
            raise _database_error("install", exc) from exc
        finally:
            await engine.dispose()

    _run(main)


# -- check ------------------------------------------------------------------------------------


@cli.command()
@click.option("--replicas", type=int, help="Processes expected to run at once.")
@click.pass_context
def check(ctx: click.Context, replicas: int | None) -> None:
    """Validate configuration and database: connections, listener, triggers, connection budget."""
    from pgreact.checks import run_checks

    settings = _load(ctx, replicas=replicas)
    report = _run(lambda: run_checks(settings))
    for line in report.lines():
        click.echo(line)
    sys.exit(0 if report.ok else 1)


# -- status -----------------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Per handler: pending, waiting for retry, dead, age of the oldest pending event."""
    settings = _load(ctx)

    async def main() -> list[dict[str, Any]]:
        async with _store_connection(settings) as (conn, store):
            stats = await store.stats(conn)
            rows = await conn.exec_driver_sql(
                f'SELECT handler FROM "{settings.schema_name}".subscriptions ORDER BY 1'
            )
            names = [r[0] for r in rows]
            await conn.commit()
        by_name = {s.handler: s for s in stats}
        out = []
        for name in sorted(set(names) | set(by_name)):
            s = by_name.get(name)
            out.append(
                {
                    "handler": name,
                    "pending": s.pending if s else 0,
                    "waiting_retry": s.waiting_retry if s else 0,
                    "dead": s.dead if s else 0,
                    "oldest_pending_age_seconds": s.oldest_pending_age if s else None,
                }
            )
        return out

    rows = _run(main)
    if as_json:
        click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    _table(
        ["handler", "pending", "retry-wait", "dead", "oldest"],
        [
            [
                r["handler"],
                r["pending"],
                r["waiting_retry"],
                r["dead"],
                "-"
                if r["oldest_pending_age_seconds"] is None
                else f"{r['oldest_pending_age_seconds']:.1f}s",
            ]
            for r in rows
        ],
    )


# -- dead -------------------------------------------------------------------------------------


@cli.group()
def dead() -> None:
    """Inspect and act on dead-lettered events."""


@dead.command("list")
@click.option("--handler", "handler_name", help="Only this handler's dead letters.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--limit", type=int, default=1000, show_default=True)
@click.pass_context
def dead_list(ctx: click.Context, handler_name: str | None, as_json: bool, limit: int) -> None:
    """List dead-lettered events."""
    settings = _load(ctx)

    async def main() -> list[dict[str, Any]]:
        async with _store_connection(settings) as (conn, store):
            letters = await store.dead_list(conn, handler_name, limit)
        return [
            {
                "id": d.delivery_id,
                "handler": d.handler,
                "event_id": d.change_id,
                "table": d.table,
                "op": d.op,
                "key": d.key,
                "attempts": d.attempts,
                "last_error": d.last_error,
                "created_at": d.created_at.isoformat(),
                "dead_at": d.dead_at.isoformat(),
            }
            for d in letters
        ]

    rows = _run(main)
    if as_json:
        click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    _table(
        ["id", "handler", "table", "op", "key", "attempts", "last error"],
        [
            [
                r["id"],
                r["handler"],
                r["table"],
                r["op"],
                r["key"],
                r["attempts"],
                (r["last_error"] or "").splitlines()[0][:80] if r["last_error"] else "",
            ]
            for r in rows
        ],
    )


def _dead_action(name: str, verb: str) -> Callable[..., None]:
    @click.option("--all", "all_", is_flag=True, help=f"{verb.capitalize()} every dead letter.")
    @click.argument("ids", nargs=-1, type=int)
    @click.pass_context
    def command(ctx: click.Context, all_: bool, ids: Sequence[int]) -> None:
        if all_ == bool(ids):
            raise click.UsageError("give either --all or one or more IDs (see `dead list`)")
        settings = _load(ctx)

        async def main() -> int:
            from pgreact.installer import wake_channel

            async with _store_connection(settings) as (conn, store):
                action = store.dead_retry if name == "retry" else store.dead_purge
                count = await action(conn, None if all_ else list(ids))
                if name == "retry" and count:
                    await conn.exec_driver_sql(
                        f"SELECT pg_notify('{wake_channel(settings.schema_name)}', '')"
                    )
                    await conn.commit()
            return count

        count: int = _run(main)
        click.echo(f"pgreact: {count} dead letter(s) {verb}")

    command.__doc__ = f"{verb.capitalize()} dead letters: --all, or the IDs from `dead list`."
    return command


dead.command("retry")(_dead_action("retry", "requeued"))
dead.command("purge")(_dead_action("purge", "purged"))


# -- demo -------------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--duration",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds to produce changes; 0 runs until Ctrl-C.",
)
@click.option(
    "--rate", type=float, default=200.0, show_default=True, help="Orders created per second."
)
@click.option("--http-port", type=int, default=None, help="Metrics port (default 9000).")
@click.pass_context
def demo(ctx: click.Context, duration: float, rate: float, http_port: int | None) -> None:
    """Run a live demo on an embedded PostgreSQL (or PGREACT_DATABASE_URL) and check the result."""
    from pgreact.demo import run_demo

    state: _State = ctx.ensure_object(_State)
    ok = _run(lambda: run_demo(state.config, duration=duration, rate=rate, http_port=http_port))
    sys.exit(0 if ok else 1)


# -- helpers ----------------------------------------------------------------------------------


def _load(ctx: click.Context, **overrides: Any) -> Settings:
    try:
        settings = _settings(ctx, **overrides)
        settings.require_database_url()
    except PgreactError as exc:
        click.echo(f"pgreact: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    return settings


@contextlib.asynccontextmanager
async def _store_connection(settings: Settings) -> AsyncIterator[tuple[AsyncConnection, Store]]:
    """A one-connection engine and a Store, for the short CLI commands."""
    from pgreact.db import create_write_engine
    from pgreact.store import Store

    engine = create_write_engine(settings)
    try:
        try:
            conn = await engine.connect()
        except Exception as exc:
            raise _database_error("connect", exc) from exc
        try:
            from pgreact.errors import SchemaError
            from pgreact.installer import schema_version

            if await schema_version(conn, settings.schema_name) == 0:
                raise SchemaError(
                    f"pgreact is not installed in schema {settings.schema_name!r} of this "
                    "database: run `pgreact install` first (or check PGREACT_SCHEMA)"
                )
            await conn.commit()
            yield conn, Store(settings.schema_name)
        except PgreactError:
            raise
        except Exception as exc:
            raise _database_error("query", exc) from exc
        finally:
            await conn.close()
    finally:
        await engine.dispose()


def _database_error(what: str, exc: BaseException) -> PgreactError:
    if isinstance(exc, PgreactError):
        return exc
    from pgreact.settings import mask_url

    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    return PgreactError(f"{what} failed: {type(exc).__name__}: {mask_url(first)}")


def _table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [header] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def main() -> None:
    cli(prog_name="pgreact")


if __name__ == "__main__":
    main()
