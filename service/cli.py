"""``pgreact`` command line. Exit codes: 0 success, 1 runtime failure, 2 usage/configuration."""

from __future__ import annotations

import contextlib
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import anyio
import click
import orjson
import structlog

from pgreact.errors import PgreactError, leaf_errors
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


def _run(main: Callable[[], Awaitable[T]], settings: Settings | None = None) -> T:
    """Run ``main`` on asyncio (uvloop when installed) and map errors to exit codes: ours with
    their message, a database or network problem with one line naming the (masked) URL.
    Anything else is a bug and keeps its traceback."""
    try:
        return anyio.run(main, backend="asyncio", backend_options=_loop_options())
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        leaves = list(leaf_errors(exc))
        mine = [e for e in leaves if isinstance(e, PgreactError)]
        if mine:
            _fail(mine[0])
        outside = [e for e in leaves if _is_environment_error(e)]
        if outside:
            _fail(_database_error("database access", outside[0], settings))
        raise


def _is_environment_error(exc: BaseException) -> bool:
    """A failure of the database, the network or the machine, not of pgreact's code: a wrong
    password, an unknown host, a refused or dropped connection, a server error."""
    import asyncpg
    import psycopg
    import sqlalchemy.exc

    return isinstance(
        exc,
        OSError
        | sqlalchemy.exc.DBAPIError
        | sqlalchemy.exc.DisconnectionError
        | sqlalchemy.exc.TimeoutError
        | asyncpg.PostgresError
        | asyncpg.InterfaceError
        | psycopg.Error,
    )


def _fail(exc: BaseException) -> NoReturn:
    click.echo(f"pgreact: error: {_one_line(exc)}", err=True)
    sys.exit(exc.exit_code if isinstance(exc, PgreactError) else 1)


def _one_line(exc: BaseException) -> str:
    from pgreact.settings import mask_url

    return mask_url(str(exc) or type(exc).__name__)


def _warn(settings: Settings) -> None:
    for note in settings.config_warnings():
        click.echo(f"pgreact: warning: {note}", err=True)


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
        _fail(exc)
    configure_logging(settings.log_format, settings.log_level)
    log = structlog.get_logger("pgreact.cli")
    for note in settings.config_warnings():
        log.warning("configuration", detail=note)

    async def main() -> None:
        daemon = Daemon(settings, router, exit_when_stuck=True)
        async with anyio.create_task_group() as tg:

            async def on_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("signal_received", signal=signal.Signals(signum).name)
                        daemon.stop()

            tg.start_soon(on_signals)
            await daemon.run()
            tg.cancel_scope.cancel()

    _run(main, settings)


# -- install ----------------------------------------------------------------------------------


@cli.command()
@click.option("--print-sql", is_flag=True, help="Print the DDL instead of applying it.")
@click.option("--prune", is_flag=True, help="Remove capture from tables no longer handled.")
@click.option(
    "--print-grants",
    "grants_role",
    metavar="ROLE",
    help="Print the least privileges ROLE needs to run the daemon (no DDL), and exit.",
)
@click.pass_context
def install(ctx: click.Context, print_sql: bool, prune: bool, grants_role: str | None) -> None:
    """Create or upgrade pgreact's schema and the capture triggers (idempotent)."""
    from pgreact import installer
    from pgreact.db import create_write_engine
    from pgreact.router import load_routers

    if grants_role is not None:
        click.echo(installer.grants_sql(_settings(ctx).schema_name, grants_role), nl=False)
        return
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
                plan = await installer.install(
                    engine,
                    router,
                    settings.schema_name,
                    prune=prune,
                    on_wait=lambda message: click.echo(f"pgreact: {message}", err=True),
                )
                click.echo(
                    f"pgreact: schema {settings.schema_name!r} at version {plan.to_version}; "
                    f"{len(router.durable)} handler(s) on "
                    f"{len({h.table for h in router.durable})} table(s) installed",
                    err=True,
                )
            for note in plan.notes:
                click.echo(f"pgreact: note: {note}", err=True)
        except Exception as exc:
            raise _database_error("install", exc, settings) from exc
        finally:
            await engine.dispose()

    _run(main, settings)


# -- check ------------------------------------------------------------------------------------


@cli.command()
@click.option("--replicas", type=int, help="Processes expected to run at once.")
@click.pass_context
def check(ctx: click.Context, replicas: int | None) -> None:
    """Validate configuration and database: connections, listener, triggers, connection budget."""
    from pgreact.checks import run_checks

    settings = _load(ctx, replicas=replicas, warn=False)  # check reports them itself
    report = _run(lambda: run_checks(settings), settings)
    for line in report.lines():
        click.echo(line)
    sys.exit(0 if report.ok else 1)


# -- status -----------------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show, per handler, pending, waiting for retry, dead, and the oldest pending event's age."""
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

    rows = _run(main, settings)
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
                human_age(r["oldest_pending_age_seconds"]),
            ]
            for r in rows
        ],
    )


# -- dead -------------------------------------------------------------------------------------


@cli.group()
def dead() -> None:
    """Inspect and act on dead-lettered events."""


@dead.command("list")
@click.option("--handler", "handler_name", help="Show only this handler's dead letters.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--limit", type=int, default=1000, show_default=True, help="Show at most N.")
@click.pass_context
def dead_list(ctx: click.Context, handler_name: str | None, as_json: bool, limit: int) -> None:
    """List dead-lettered events, oldest first."""
    settings = _load(ctx)

    async def main() -> list[dict[str, Any]]:
        async with _store_connection(settings) as (conn, store):
            letters = await store.dead_list(conn, handler_name, limit)
            now = await _server_now(conn)
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
                "dead_for_seconds": max(0.0, (now - d.dead_at).total_seconds()),
            }
            for d in letters
        ]

    rows = _run(main, settings)
    if as_json:
        click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    _table(
        ["id", "handler", "table", "op", "key", "attempts", "dead for", "last error"],
        [
            [
                r["id"],
                r["handler"],
                r["table"],
                r["op"],
                r["key"],
                r["attempts"],
                human_age(r["dead_for_seconds"]),
                (r["last_error"] or "").splitlines()[0][:80] if r["last_error"] else "",
            ]
            for r in rows
        ],
    )


@dead.command("show")
@click.argument("ids", nargs=-1, type=int, required=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def dead_show(ctx: click.Context, ids: Sequence[int], as_json: bool) -> None:
    """Show everything stored about dead letters: row images, the full error, times."""
    settings = _load(ctx)

    async def main() -> tuple[list[dict[str, Any]], datetime]:
        async with _store_connection(settings) as (conn, store):
            letters = await store.dead_show(conn, ids)
            return letters, await _server_now(conn)

    letters, now = _run(main, settings)
    _require_known(ids, {d["id"] for d in letters}, changing=False)
    out = [_shown(d, now) for d in letters]
    if as_json:
        click.echo(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
        return
    for index, d in enumerate(out):
        if index:
            click.echo("")
        click.echo(f"dead letter {d['id']}: handler {d['handler']}, {d['op']} on {d['table']}")
        click.echo(f"  key:        {d['key']}")
        click.echo(f"  event id:   {d['event_id']}")
        click.echo(f"  attempts:   {d['attempts']}")
        for label, at, age in (
            ("captured:", d["created_at"], d["captured_ago_seconds"]),
            ("last fail:", d["failed_at"], d["failed_ago_seconds"]),
            ("dead since:", d["dead_at"], d["dead_for_seconds"]),
        ):
            if at is not None:
                click.echo(f"  {label:<11} {at} ({human_age(age)} ago)")
        for label, image in (("new row:", d["new"]), ("old row:", d["old"])):
            if image is not None:
                click.echo(f"  {label:<11} {orjson.dumps(image).decode()}")
        click.echo("  error:")
        for line in (d["last_error"] or "(none recorded)").splitlines():
            click.echo(f"    {line}")


def _shown(d: dict[str, Any], now: datetime) -> dict[str, Any]:
    def ago(at: datetime | None) -> float | None:
        return None if at is None else max(0.0, (now - at).total_seconds())

    def image(raw: Any) -> Any:
        return orjson.loads(raw) if isinstance(raw, str | bytes) else raw

    return {
        "id": d["id"],
        "handler": d["handler"],
        "event_id": d["change_id"],
        "table": d["table_name"],
        "op": d["op"],
        "key": d["row_key"],
        "attempts": d["attempts"],
        "last_error": d["last_error"],
        "new": image(d["new_row"]),
        "old": image(d["old_row"]),
        "created_at": d["created_at"].isoformat(),
        "failed_at": None if d["failed_at"] is None else d["failed_at"].isoformat(),
        "dead_at": d["dead_at"].isoformat(),
        "captured_ago_seconds": ago(d["created_at"]),
        "failed_ago_seconds": ago(d["failed_at"]),
        "dead_for_seconds": ago(d["dead_at"]),
    }


def _require_known(ids: Sequence[int], found: set[int], *, changing: bool) -> None:
    missing = sorted(set(ids) - found)
    if missing:
        _fail(
            PgreactError(
                f"no dead letter with ID {', '.join(map(str, missing))} (an event that is "
                "still live, already requeued or purged, or a wrong ID: see `pgreact dead list`)"
                + ("; nothing was changed" if changing else "")
            )
        )


def _dead_action(name: str, verb: str, help_text: str) -> Callable[..., None]:
    @click.option("--all", "all_", is_flag=True, help=f"{name.capitalize()} every dead letter.")
    @click.argument("ids", nargs=-1, type=int)
    @click.pass_context
    def command(ctx: click.Context, /, all_: bool, ids: Sequence[int], **flags: bool) -> None:
        if all_ == bool(ids):
            raise click.UsageError("give either --all or one or more IDs (see `dead list`)")
        settings = _load(ctx)

        async def count_all() -> int:
            async with _store_connection(settings) as (conn, store):
                return sum(s.dead for s in await store.stats(conn))

        if name == "purge" and all_ and not flags.get("yes"):
            _confirm_purge_all(_run(count_all, settings))

        async def main() -> int:
            from pgreact.installer import wake_channel

            async with _store_connection(settings) as (conn, store):
                if not all_:
                    known = {d["id"] for d in await store.dead_show(conn, ids)}
                    _require_known(ids, known, changing=True)
                action = store.dead_retry if name == "retry" else store.dead_purge
                count = await action(conn, None if all_ else list(ids))
                if name == "retry" and count:
                    await conn.exec_driver_sql(
                        f"SELECT pg_notify('{wake_channel(settings.schema_name)}', '')"
                    )
                    await conn.commit()
            return count

        count: int = _run(main, settings)
        click.echo(f"pgreact: {count} dead letter(s) {verb}")

    command.__doc__ = help_text
    return command


def _confirm_purge_all(count: int) -> None:
    """Purging every dead letter cannot be undone: ask, or refuse when nobody can answer."""
    if count == 0:
        return
    question = f"Delete all {count} dead letter(s) of every handler for good?"
    if not sys.stdin.isatty():
        _fail(
            PgreactError(
                f"dead purge --all would delete {count} dead letter(s) for good and there is "
                "no terminal to confirm it: add --yes"
            )
        )
    if not click.confirm(question, default=False, err=True):
        _fail(PgreactError("nothing purged"))


dead.command("retry")(
    _dead_action(
        "retry",
        "requeued",
        "Requeue dead letters with a fresh attempt budget: --all, or IDs from `dead list`.",
    )
)
dead.command("purge")(
    click.option("--yes", is_flag=True, help="Purge --all without asking.")(
        _dead_action(
            "purge",
            "purged",
            "Delete dead letters for good: --all (asks unless --yes), or IDs from `dead list`.",
        )
    )
)


def human_age(seconds: float | None) -> str:
    """An age as people read it: ``42s``, ``3m 12s``, ``2h 5m``, ``3d 4h``; ``-`` for none."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


async def _server_now(conn: AsyncConnection) -> datetime:
    """The database's clock: ages are measured against the clock that stamped the rows."""
    value = (await conn.exec_driver_sql("SELECT now()")).scalar_one()
    await conn.commit()
    return cast("datetime", value)


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


def _load(ctx: click.Context, *, warn: bool = True, **overrides: Any) -> Settings:
    try:
        settings = _settings(ctx, **overrides)
        settings.require_database_url()
    except PgreactError as exc:
        _fail(exc)
    if warn:
        _warn(settings)
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
            raise _database_error("connect", exc, settings) from exc
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
            raise _database_error("query", exc, settings) from exc
        finally:
            await conn.close()
    finally:
        await engine.dispose()


def _database_error(
    what: str, exc: BaseException, settings: Settings | None = None
) -> PgreactError:
    """One line: what failed, where (the masked URL), and the driver's first line."""
    if isinstance(exc, PgreactError):
        return exc
    from pgreact.settings import mask_url

    first = next((line for line in str(exc).splitlines() if line.strip()), "")
    cause = exc.__cause__ or getattr(exc, "orig", None)
    name = type(cause if isinstance(cause, BaseException) else exc).__name__
    where = ""
    if settings is not None and settings.database_url:
        where = f" at {mask_url(settings.require_database_url())} (PGREACT_DATABASE_URL)"
    first = re.sub(r"^\([\w.]+\) ", "", first)  # SQLAlchemy's "(driver.Error) " prefix
    return PgreactError(f"{what} failed{where}: {name}: {mask_url(first) or 'no detail'}")


def _table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [header] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def main() -> None:
    cli(prog_name="pgreact")


if __name__ == "__main__":
    main()
