"""pgreact's schema is closed to everyone but its owner (issue 12, item 6): writers of a watched
table need no right in it and cannot forge or wedge queue rows; ``install`` runs as an owner
role; ``run`` works with exactly what ``install --print-grants`` prints. Both drivers."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest
from psycopg import errors
from sqlalchemy.ext.asyncio import AsyncSession

from pgreact import Event, Router
from pgreact.errors import SchemaError
from tests.conftest import to_sa_url
from tests.handlers.effects import router as effects_router
from tests.support import (
    create_tables,
    install,
    make_settings,
    pgreact_cli,
    running,
    sql,
    wait_until,
)

pytestmark = pytest.mark.anyio

PASSWORD = "pgreact-test"


async def noop(event: Event, session: AsyncSession) -> None:
    """Installation tests never run it."""


Roles = Callable[[str], str]


def as_role(dsn: str, role: str) -> str:
    """``dsn`` with ``role`` (and its password) as the user."""
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(role)}:{quote(PASSWORD)}@{host}"))


@pytest.fixture
def roles(pg_dsn: str) -> Iterator[Roles]:
    """Make login roles (unique names: roles are cluster-wide); dropped after the test."""
    made: list[str] = []

    def make(purpose: str) -> str:
        name = f"pgreact_{purpose}_{uuid.uuid4().hex[:8]}"
        sql(pg_dsn, f"CREATE ROLE {name} LOGIN PASSWORD '{PASSWORD}'")
        made.append(name)
        return name

    yield make
    for name in made:
        sql(pg_dsn, f"DROP OWNED BY {name} CASCADE")
    for name in made:
        sql(pg_dsn, f"DROP ROLE {name}")


FORGERIES = [
    # a made-up event for a handler, a fake lease that would wedge a key, the doorbell, capture
    "INSERT INTO pgreact.queue (change_id, handler, table_name, op) "
    "VALUES (1, 'single', 'public.payroll', 'INSERT')",
    "UPDATE pgreact.queue SET lease_until = 'infinity', owner = 1",
    "SELECT count(*) FROM pgreact.queue",
    "UPDATE pgreact.doorbell SET armed = false",
    "SELECT pgreact.ring()",
    "SELECT pgreact.enqueue_row(ARRAY[1::oid], 'INSERT', '{}', NULL, NULL)",
    "INSERT INTO pgreact.subscriptions (handler, table_schema, table_name, ops) "
    "VALUES ('x', 'public', 'source', '{INSERT}')",
]


async def test_a_writer_with_only_insert_is_captured_and_can_forge_nothing(
    pg_dsn: str, sa_url: str, roles: Roles
) -> None:
    create_tables(pg_dsn)
    await install(sa_url, effects_router)
    writer = roles("writer")
    sql(pg_dsn, f"GRANT INSERT ON source TO {writer}")
    sql(as_role(pg_dsn, writer), "INSERT INTO source VALUES (1, 1)")
    rows = sql(pg_dsn, "SELECT handler, op, row_key FROM pgreact.queue ORDER BY handler")
    assert rows == [("batch", "INSERT", "1"), ("single", "INSERT", "1")]
    for statement in FORGERIES:
        with pytest.raises(errors.InsufficientPrivilege):
            sql(as_role(pg_dsn, writer), statement)
    assert sql(pg_dsn, "SELECT count(*), count(lease_until) FROM pgreact.queue") == [(2, 0)]


async def test_install_as_owner_and_run_with_exactly_the_printed_grants(
    pg_dsn: str, driver: str, roles: Roles
) -> None:
    create_tables(pg_dsn)  # the application's tables, not the owner's
    owner, runner, writer = roles("owner"), roles("runner"), roles("writer")
    database = unquote(urlsplit(pg_dsn).path.lstrip("/"))
    sql(pg_dsn, f'GRANT CREATE ON DATABASE "{database}" TO {owner}')
    sql(pg_dsn, f"GRANT TRIGGER ON source TO {owner}")
    sql(pg_dsn, f"GRANT INSERT ON source TO {writer}")
    # What the handlers write is theirs to grant.
    sql(pg_dsn, f"GRANT INSERT ON effects TO {runner}")
    sql(pg_dsn, f"GRANT USAGE ON SEQUENCE effects_seq_seq TO {runner}")

    await install(to_sa_url(as_role(pg_dsn, owner), driver), effects_router)
    printed = pgreact_cli(
        "install", "--print-grants", runner, env={"PGREACT_HANDLERS": "handlers.effects"}
    )
    assert printed.returncode == 0, printed.stderr
    assert f'GRANT USAGE ON SCHEMA "pgreact" TO "{runner}";' in printed.stdout
    sql(as_role(pg_dsn, owner), printed.stdout)

    runner_dsn = as_role(pg_dsn, runner)
    for ddl in ("CREATE TABLE public.nope (id int)", "CREATE SCHEMA nope", "DROP TABLE source"):
        with pytest.raises((errors.InsufficientPrivilege, errors.ObjectNotInPrerequisiteState)):
            sql(runner_dsn, ddl)

    async with running(make_settings(to_sa_url(runner_dsn, driver)), effects_router):
        sql(as_role(pg_dsn, writer), "INSERT INTO source VALUES (1, 1), (2, 2)")
        await wait_until(
            lambda: sql(pg_dsn, "SELECT count(*) FROM effects")[0][0] == 4,
            message="2 changes handled by 2 handlers",
        )
        await wait_until(
            lambda: sql(pg_dsn, "SELECT count(*) FROM pgreact.queue")[0][0] == 0,
            message="an empty queue",
        )
    handled = sql(pg_dsn, "SELECT handler, k FROM effects ORDER BY handler, k")
    assert handled == [("batch", "1"), ("batch", "2"), ("single", "1"), ("single", "2")]


async def test_nothing_of_pgreact_is_granted_to_public(pg_dsn: str, sa_url: str) -> None:
    create_tables(pg_dsn)
    await install(sa_url, effects_router)
    public = sql(
        pg_dsn,
        """
        SELECT 'schema', has_schema_privilege('public', 'pgreact', 'USAGE')
        UNION ALL
        SELECT p.proname, has_function_privilege('public', p.oid, 'EXECUTE')
        FROM pg_proc p WHERE p.pronamespace = 'pgreact'::regnamespace
        """,
    )
    assert [name for name, granted in public if granted] == []
    definer = sql(
        pg_dsn,
        "SELECT proname, prosecdef, proconfig FROM pg_proc "
        "WHERE pronamespace = 'pgreact'::regnamespace AND proname LIKE 'capture\\_%' "
        "AND proname <> 'capture_state' ORDER BY 1",
    )
    assert [r[0] for r in definer] == [
        "capture_delete",
        "capture_insert",
        "capture_row",
        "capture_truncate",
        "capture_update",
    ]
    assert all(r[1] and r[2] == ["search_path=pg_catalog, pg_temp"] for r in definer)


async def test_check_flags_roles_that_can_forge_and_a_superuser_owner(
    pg_dsn: str, sa_url: str, driver: str, roles: Roles
) -> None:
    create_tables(pg_dsn)
    owner, writer = roles("owner"), roles("writer")
    database = unquote(urlsplit(pg_dsn).path.lstrip("/"))
    sql(pg_dsn, f'GRANT CREATE ON DATABASE "{database}" TO {owner}')
    sql(pg_dsn, f"GRANT TRIGGER ON source TO {owner}")
    await install(to_sa_url(as_role(pg_dsn, owner), driver), effects_router)
    # What a writer needed before version 4 (capture ran as the writer).
    sql(as_role(pg_dsn, owner), f"GRANT USAGE ON SCHEMA pgreact TO {writer}")
    sql(as_role(pg_dsn, owner), f"GRANT INSERT ON pgreact.queue TO {writer}")
    env = {
        "PGREACT_DATABASE_URL": sa_url,
        "PGREACT_HANDLERS": "handlers.effects",
        "PGREACT_HTTP_PORT": "0",
    }

    def privileges() -> list[str]:
        result = pgreact_cli("check", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return [line for line in result.stdout.splitlines() if "] privileges:" in line]

    flagged = privileges()
    assert len(flagged) == 1 and flagged[0].startswith("[WARN]"), flagged
    assert f"{writer} may INSERT queue" in flagged[0] and "revoke" in flagged[0]
    sql(as_role(pg_dsn, owner), f"REVOKE INSERT ON pgreact.queue FROM {writer}")
    assert privileges() == [
        f"[OK  ] privileges: capture runs as '{owner}'; no other role can write events"
    ]
    superuser = sql(pg_dsn, "SELECT current_user")[0][0]  # the test server's
    sql(pg_dsn, f'ALTER SCHEMA pgreact OWNER TO "{superuser}"')
    (flagged,) = privileges()
    assert flagged.startswith("[WARN]") and f"owned by superuser '{superuser}'" in flagged


EVIL = """
CREATE FUNCTION public.evil(mood) RETURNS json LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pgreact.queue (change_id, handler, table_name, op)
        VALUES (0, 'single', 'public.payroll', 'INSERT');
    RETURN to_json(current_user::text);
END $$;
CREATE CAST (mood AS json) WITH FUNCTION public.evil(mood)
"""


async def test_a_cast_to_json_someone_else_owns_is_refused_by_install_and_reported(
    pg_dsn: str, sa_url: str, driver: str, roles: Roles
) -> None:
    """to_jsonb() in capture (SECURITY DEFINER) calls a type's cast to json: the owner of a type
    a watched table uses could run SQL as pgreact's schema owner through one."""
    create_tables(pg_dsn)
    app = roles("app")
    sql(pg_dsn, f"GRANT CREATE ON SCHEMA public TO {app}")
    app_dsn = as_role(pg_dsn, app)
    sql(app_dsn, "CREATE TYPE mood AS ENUM ('ok', 'evil')")
    sql(pg_dsn, "ALTER TABLE source ADD COLUMN m mood")
    await install(sa_url, effects_router)
    sql(app_dsn, EVIL)  # after the install: only the health checks can see it

    # check (and the daemon's probe, which runs the same capture_problems) report it ...
    env = {
        "PGREACT_DATABASE_URL": sa_url,
        "PGREACT_HANDLERS": "handlers.effects",
        "PGREACT_HTTP_PORT": "0",
    }
    check = pgreact_cli("check", env=env)
    assert check.returncode == 1, check.stdout
    (failed,) = [line for line in check.stdout.splitlines() if line.startswith("[FAIL] triggers")]
    for part in ("public.source", "column m", "public.mood", "public.evil(public.mood)", app):
        assert part in failed, failed
    state = sql(pg_dsn, "SELECT handler, unsafe FROM pgreact.capture_state() ORDER BY 1")
    assert state == [
        (
            name,
            [
                f"column m (type public.mood) has a cast to json through "
                f"public.evil(public.mood), owned by {app}"
            ],
        )
        for name in ("batch", "single")
    ]

    # ... and install refuses, naming the table, column, type, function, owner and the fix.
    with pytest.raises(SchemaError) as info:
        await install(sa_url, effects_router)
    message = str(info.value)
    for part in (
        "public.source column m (type public.mood)",
        "function public.evil(public.mood), owned by " + app,
        "DROP CAST (public.mood AS json)",
        "OWNER TO",
    ):
        assert part in message, message

    # Reached through an array, a composite and a domain too; a first install refuses as well,
    # and leaves nothing behind.
    sql(pg_dsn, "DROP SCHEMA pgreact CASCADE")
    sql(
        app_dsn,
        "CREATE DOMAIN calm AS mood; CREATE TYPE pair AS (a int, b calm); "
        "CREATE TABLE feelings (id int PRIMARY KEY, p pair[])",
    )
    router = Router()
    router.on("public.feelings", name="feel")(noop)
    with pytest.raises(SchemaError) as info:
        await install(sa_url, router)
    assert "public.feelings column p (type public.mood)" in str(info.value)
    assert sql(pg_dsn, "SELECT to_regnamespace('pgreact')") == [(None,)]

    # A cast whose function a superuser owns is trusted.
    superuser = sql(pg_dsn, "SELECT current_user")[0][0]
    sql(pg_dsn, f'ALTER FUNCTION public.evil(mood) OWNER TO "{superuser}"')
    await install(sa_url, router)
    assert sql(pg_dsn, "SELECT unsafe FROM pgreact.capture_state()") == [([],)]
