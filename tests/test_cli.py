"""The ``pgreact`` command line as users run it: a subprocess (``python -m pgreact.cli``).

Configuration errors exit 2 naming the setting; runtime failures exit 1 with an actionable
message; ``status``, ``dead`` and ``check`` report what is in the database. Every database URL
carries a password (the test server trusts everyone, so it is ignored) and no output may show it.

Each CLI run costs a Python start-up, so independent runs go in parallel threads.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import DRIVERS, to_sa_url
from sqlalchemy.engine import make_url

from tests.handlers.effects import router as effects_router
from tests.support import (
    ROOT,
    create_tables,
    effect_counts,
    install,
    make_settings,
    pgreact_cli,
    queue_state,
    running,
    sql,
    wait_until,
)

PASSWORD = "CliS3cretPw"
# Nothing listens on port 9 here; config errors must be reported before any connection.
UNREACHABLE = f"postgresql+asyncpg://postgres:{PASSWORD}@127.0.0.1:9/nowhere"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI inherits os.environ: no stray PGREACT_* setting of the caller may leak in."""
    for name in list(os.environ):
        if name.startswith("PGREACT_") and name != "PGREACT_CACHE_DIR":
            monkeypatch.delenv(name)


@dataclass(frozen=True)
class Call:
    args: Sequence[str]
    env: Mapping[str, str]
    cwd: Path | None = None


def cli(
    *args: str, env: Mapping[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return run_all([Call(args, env, cwd)])[0]


def run_all(calls: Sequence[Call]) -> list[subprocess.CompletedProcess[str]]:
    """Run CLI calls in parallel; every output is checked for the password."""

    def one(call: Call) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {} if call.cwd is None else {"cwd": call.cwd}
        return pgreact_cli(*call.args, env=call.env, **kwargs)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(one, calls))
    for call, result in zip(calls, results, strict=True):
        shown = result.stdout + result.stderr
        assert PASSWORD not in shown, f"`pgreact {' '.join(call.args)}` printed the password"
    return results


def with_password(libpq_url: str) -> str:
    """Put PASSWORD into a URL that has none (the embedded server trusts everyone and ignores
    it); a URL with its own password is left as it is."""
    return re.sub(r"^(postgres(?:ql)?://)([^:@/]+)@", rf"\g<1>\g<2>:{PASSWORD}@", libpq_url)


def db_env(pg_dsn: str, driver: str, **extra: str) -> dict[str, str]:
    url = to_sa_url(with_password(pg_dsn), driver)
    return {
        "PGREACT_DATABASE_URL": url,
        "PGREACT_HANDLERS": "handlers.effects",
        "PGREACT_HTTP_HOST": "127.0.0.1",
        "PGREACT_HTTP_PORT": "0",
        **extra,
    }


def setup_installed(pg_dsn: str, sa_url: str) -> None:
    create_tables(pg_dsn)
    anyio.run(install, sa_url, effects_router)


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


# -- configuration and usage errors (no database needed) --------------------------------------

RAISES_ON_IMPORT = "pgreact_cli_broken_handlers"


def test_configuration_and_usage_errors_exit_2_naming_the_setting(tmp_path: Path) -> None:
    (tmp_path / f"{RAISES_ON_IMPORT}.py").write_text("raise RuntimeError('no config here')\n")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("pool_size = 3\npol_size = 4\n")
    base = {"PGREACT_DATABASE_URL": UNREACHABLE, "PGREACT_HANDLERS": "handlers.effects"}
    no_url = {"PGREACT_HANDLERS": "handlers.effects"}
    no_handlers = {"PGREACT_DATABASE_URL": UNREACHABLE}
    # (The settings themselves are covered in depth by test_settings; these check that each
    # command path turns them into exit 2 and a message instead of a traceback.)
    cases: list[tuple[Call, Sequence[str]]] = [
        (Call(["run"], {**base, "PGREACT_POOL_SIZE": "abc"}), ["PGREACT_POOL_SIZE", "'abc'"]),
        (Call(["status"], {**base, "PGREACT_LISTENER": "nope"}), ["PGREACT_LISTENER", "psycopg"]),
        (Call(["status"], no_url), ["PGREACT_DATABASE_URL", "postgresql+asyncpg://"]),
        (Call(["run"], no_handlers), ["PGREACT_HANDLERS"]),
        (Call(["install"], no_handlers), ["PGREACT_HANDLERS"]),
        (Call(["--config", str(unknown), "check"], base), ["pol_size", str(unknown)]),
        (
            Call(
                ["run"],
                {**base, "PGREACT_HANDLERS": f"handlers.effects,{RAISES_ON_IMPORT}"},
                cwd=tmp_path,  # `python -m` puts the working directory on sys.path
            ),
            [RAISES_ON_IMPORT, "no config here", "PGREACT_HANDLERS"],
        ),
        (Call(["dead", "retry"], base), ["--all", "IDs"]),
    ]
    results = run_all([call for call, _ in cases])
    problems = []
    for (call, fragments), result in zip(cases, results, strict=True):
        name = f"pgreact {' '.join(call.args)}"
        missing = [f for f in fragments if f not in result.stderr]
        if result.returncode != 2 or missing or "Traceback" in result.stderr:
            problems.append(f"{name}: missing {missing} in\n{describe(result)}")
    assert not problems, "\n\n".join(problems)


def test_malformed_database_url_exits_2() -> None:
    url = f"postgresql+asyncpg://postgres:{PASSWORD}@127.0.0.1:notaport/db"
    result = cli("status", env={"PGREACT_DATABASE_URL": url})
    assert result.returncode == 2, describe(result)
    assert "PGREACT_DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_connection_failure_exits_1_without_password() -> None:
    result = cli("status", env={"PGREACT_DATABASE_URL": UNREACHABLE})
    assert result.returncode == 1, describe(result)
    assert result.stderr.startswith("pgreact: error:")
    assert "Traceback" not in result.stderr


# -- run / status before install --------------------------------------------------------------


def test_run_before_install_exits_1_and_says_to_install(pg_dsn: str, driver: str) -> None:
    create_tables(pg_dsn)
    result = cli("run", env=db_env(pg_dsn, driver))
    assert result.returncode == 1, describe(result)
    assert "run `pgreact install`" in result.stderr


def test_commands_before_install_fail_cleanly(pg_dsn: str, driver: str) -> None:
    env = db_env(pg_dsn, driver)
    commands = (["run"], ["status"])
    results = run_all([Call(args, env) for args in commands])
    problems = [
        f"pgreact {args[0]}: {describe(result)}"
        for args, result in zip(commands, results, strict=True)
        if result.returncode != 1
        or "pgreact install" not in result.stderr
        or "Traceback" in result.stderr
    ]
    assert not problems, "\n\n".join(problems)


# -- status -----------------------------------------------------------------------------------


def test_status_counts_pending_retrying_and_dead_events(
    pg_dsn: str, sa_url: str, driver: str
) -> None:
    setup_installed(pg_dsn, sa_url)
    sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 5) g")
    sql(pg_dsn, "UPDATE source SET v = v + 1 WHERE id <= 2")  # 7 changes per handler
    sql(
        pg_dsn,
        "UPDATE pgreact.queue SET dead_at = now(), attempts = 3, last_error = 'boom' "
        "WHERE handler = 'single' AND row_key IN ('4', '5')",
    )
    sql(
        pg_dsn,
        "UPDATE pgreact.queue SET run_at = now() + interval '1 hour', attempts = 1 "
        "WHERE handler = 'batch' AND row_key = '3'",
    )
    env = db_env(pg_dsn, driver)
    as_json, as_text = run_all([Call(["status", "--json"], env), Call(["status"], env)])
    assert as_json.returncode == 0, describe(as_json)
    rows = {r["handler"]: r for r in json.loads(as_json.stdout)}
    assert set(rows) == {"single", "batch"}
    single, batch = rows["single"], rows["batch"]
    assert (single["pending"], single["waiting_retry"], single["dead"]) == (5, 0, 2)
    assert batch["dead"] == 0
    assert batch["waiting_retry"] == 1
    assert batch["pending"] in (6, 7)  # whether "pending" includes those waiting for a retry
    for row in rows.values():
        assert isinstance(row["oldest_pending_age_seconds"], float)
        assert 0 <= row["oldest_pending_age_seconds"] < 120

    assert as_text.returncode == 0, describe(as_text)
    lines = as_text.stdout.splitlines()
    assert lines[0].split() == ["handler", "pending", "retry-wait", "dead", "oldest"]
    table = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert table["single"][:3] == ["5", "0", "2"]
    assert table["batch"][1:3] == ["1", "0"]


# -- dead letters -----------------------------------------------------------------------------


def delivery_ids(pg_dsn: str, where: str) -> list[int]:
    return [r[0] for r in sql(pg_dsn, f"SELECT id FROM pgreact.queue WHERE {where} ORDER BY id")]


def effect_keys(pg_dsn: str, handler: str) -> list[str]:
    rows = sql(pg_dsn, "SELECT k FROM effects WHERE handler = %s ORDER BY k", [handler])
    return [r[0] for r in rows]


@pytest.mark.anyio
async def test_dead_list_purge_and_retry_with_a_running_daemon(
    pg_dsn: str, sa_url: str, driver: str
) -> None:
    create_tables(pg_dsn)
    await install(sa_url, effects_router)
    sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 6) g")
    sql(
        pg_dsn,
        "UPDATE pgreact.queue SET dead_at = now(), attempts = 2, failed_at = now(), "
        "last_error = 'RuntimeError: refusing key ' || row_key || E'\\nTraceback line' "
        "WHERE (handler = 'single' AND row_key IN ('1', '2', '3', '4')) "
        "   OR (handler = 'batch' AND row_key IN ('1', '2'))",
    )
    env = db_env(pg_dsn, driver)

    def run_cli(*calls: Call) -> list[subprocess.CompletedProcess[str]]:
        return run_all(calls)

    listed, only_batch, text = await anyio.to_thread.run_sync(
        run_cli,
        Call(["dead", "list", "--json"], env),
        Call(["dead", "list", "--handler", "batch", "--json"], env),
        Call(["dead", "list"], env),
    )
    for result in (listed, only_batch, text):
        assert result.returncode == 0, describe(result)
    letters = json.loads(listed.stdout)
    assert [(d["handler"], d["key"]) for d in letters] == [
        ("batch", "1"),
        ("single", "1"),
        ("batch", "2"),
        ("single", "2"),
        ("single", "3"),
        ("single", "4"),
    ]  # in capture order
    first = letters[0]
    assert first["table"] == "public.source"
    assert first["op"] == "INSERT"
    assert first["attempts"] == 2
    assert first["last_error"].startswith("RuntimeError: refusing key")
    assert {"id", "event_id", "created_at", "dead_at"} <= set(first)
    assert sorted(d["handler"] for d in json.loads(only_batch.stdout)) == ["batch", "batch"]
    text_lines = text.stdout.splitlines()
    assert text_lines[0].split()[:3] == ["id", "handler", "table"]
    assert len(text_lines) == 1 + 6
    assert "Traceback line" not in text.stdout  # only the first line of the error

    # A live delivery named alongside a dead letter: refused, nothing purged. Then just one.
    (purged_id,) = delivery_ids(pg_dsn, "handler = 'single' AND row_key = '1'")
    (live_id,) = delivery_ids(pg_dsn, "handler = 'single' AND row_key = '5'")
    refused = await anyio.to_thread.run_sync(
        lambda: cli("dead", "purge", str(purged_id), str(live_id), env=env)
    )
    assert refused.returncode == 1, describe(refused)
    assert f"no dead letter with ID {live_id} " in refused.stderr
    assert queue_state(pg_dsn)["dead"] == 6
    purge = await anyio.to_thread.run_sync(lambda: cli("dead", "purge", str(purged_id), env=env))
    assert purge.returncode == 0, describe(purge)
    assert "1 dead letter(s) purged" in purge.stdout
    assert delivery_ids(pg_dsn, f"id IN ({purged_id}, {live_id})") == [live_id]
    assert queue_state(pg_dsn)["dead"] == 5

    # A daemon that sweeps only every 60 s: what it does next is driven by notifications.
    settings = make_settings(sa_url, sweep_interval=60.0, stats_interval=60.0)
    async with running(settings, effects_router):
        await wait_until(
            lambda: (
                effect_counts(pg_dsn, "single")[0] == 2 and effect_counts(pg_dsn, "batch")[0] == 4
            ),
            message="the live events",
        )
        assert effect_keys(pg_dsn, "single") == ["5", "6"]
        assert queue_state(pg_dsn) == {"live": 0, "dead": 5, "claimed": 0}

        retry = await anyio.to_thread.run_sync(lambda: cli("dead", "retry", "--all", env=env))
        assert retry.returncode == 0, describe(retry)
        assert "5 dead letter(s) requeued" in retry.stdout
        await wait_until(
            lambda: (
                effect_counts(pg_dsn, "single")[0] == 5 and effect_counts(pg_dsn, "batch")[0] == 6
            ),
            timeout=15,
            message="the retried dead letters to be handled (woken by the retry's NOTIFY)",
        )
    assert effect_keys(pg_dsn, "single") == ["2", "3", "4", "5", "6"]
    assert effect_keys(pg_dsn, "batch") == ["1", "2", "3", "4", "5", "6"]
    # A requeued event starts a fresh attempt budget.
    attempts = sql(
        pg_dsn, "SELECT k, attempt FROM effects WHERE handler = 'single' AND k IN ('2', '3')"
    )
    assert sorted(attempts) == [("2", 1), ("3", 1)]
    assert queue_state(pg_dsn) == {"live": 0, "dead": 0, "claimed": 0}
    assert effect_counts(pg_dsn, "single") == (5, 5)
    assert effect_counts(pg_dsn, "batch") == (6, 6)


def test_dead_purge_all_leaves_live_events(pg_dsn: str, sa_url: str, driver: str) -> None:
    setup_installed(pg_dsn, sa_url)
    sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 3) g")
    sql(pg_dsn, "UPDATE pgreact.queue SET dead_at = now() WHERE row_key IN ('1', '2')")
    purge_all = cli("dead", "purge", "--all", "--yes", env=db_env(pg_dsn, driver))
    assert purge_all.returncode == 0, describe(purge_all)
    assert "4 dead letter(s) purged" in purge_all.stdout
    assert queue_state(pg_dsn) == {"live": 2, "dead": 0, "claimed": 0}


# -- check ------------------------------------------------------------------------------------


def test_check_passes_when_installed_and_fails_without_triggers(
    pg_dsn: str, sa_url: str, driver: str
) -> None:
    setup_installed(pg_dsn, sa_url)
    env = db_env(pg_dsn, driver)
    ok, status = run_all([Call(["check"], env), Call(["status", "--json"], env)])
    # Installed handlers are listed by `status` even with nothing queued.
    assert status.returncode == 0, describe(status)
    assert json.loads(status.stdout) == [
        {
            "handler": name,
            "pending": 0,
            "waiting_retry": 0,
            "dead": 0,
            "oldest_pending_age_seconds": None,
        }
        for name in ("batch", "single")
    ]
    assert ok.returncode == 0, describe(ok)
    assert "[FAIL]" not in ok.stdout
    assert ok.stdout.rstrip().splitlines()[-1].startswith("OK")
    for name in ("handlers", "database", "connections", "schema", "triggers", "listener"):
        assert f"] {name}:" in ok.stdout

    sql(pg_dsn, "DROP TRIGGER pgreact_capture_update ON source")
    broken = cli("check", env=env)
    assert broken.returncode == 1, describe(broken)
    failed = [line for line in broken.stdout.splitlines() if line.startswith("[FAIL]")]
    assert len(failed) == 1, broken.stdout
    assert "triggers" in failed[0]
    assert "public.source" in failed[0] and "UPDATE" in failed[0]
    assert "run `pgreact install`" in failed[0]
    assert broken.stdout.rstrip().splitlines()[-1].startswith("FAILED")


# -- start-up problems: one line, never a traceback (issue 12 item 14) -------------------------

EXITS_AT_IMPORT = "pgreact_cli_exits_at_import"


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *parts: str) -> None:
    __tracebackhide__ = True
    shown = describe(result)
    assert result.returncode == code, shown
    assert "Traceback" not in result.stderr + result.stdout, shown
    errors = [line for line in result.stderr.splitlines() if line.startswith("pgreact: error:")]
    assert errors, shown
    for part in parts:
        assert part in result.stderr, f"{part!r} missing:\n{shown}"


def test_startup_configuration_problems_exit_2_without_traceback(tmp_path: Path) -> None:
    (tmp_path / f"{EXITS_AT_IMPORT}.py").write_text("import sys\nsys.exit(0)\n")
    base = {"PGREACT_DATABASE_URL": UNREACHABLE, "PGREACT_HANDLERS": "handlers.effects"}
    exits = {**base, "PGREACT_HANDLERS": f"handlers.effects,{EXITS_AT_IMPORT}"}
    cases: list[tuple[Call, Sequence[str]]] = [
        (Call(["run"], {**base, "PGREACT_HANDLER_TIMEOUT": "inf"}), ["PGREACT_HANDLER_TIMEOUT"]),
        (Call(["run"], {**base, "PGREACT_SHUTDOWN_TIMEOUT": "1e400"}), ["SHUTDOWN_TIMEOUT"]),
        (
            Call(["run"], {**base, "PGREACT_TCP_KEEPALIVES_IDLE": "99999999"}),
            ["PGREACT_TCP_KEEPALIVES_IDLE"],
        ),
        (Call(["run"], {**base, "PGREACT_HTTP_PORT": "-1"}), ["PGREACT_HTTP_PORT"]),
        # A handler module calling sys.exit(0) at import: not a successful install or run.
        (Call(["install"], exits, cwd=tmp_path), [EXITS_AT_IMPORT, "SystemExit"]),
        (Call(["run"], exits, cwd=tmp_path), [EXITS_AT_IMPORT, "SystemExit"]),
        (Call(["check"], exits, cwd=tmp_path), [EXITS_AT_IMPORT, "SystemExit"]),
    ]
    results = run_all([call for call, _ in cases])
    for (call, parts), result in zip(cases, results, strict=True):
        if call.args == ["check"]:  # check reports the failure as a failed check: exit 1
            assert result.returncode == 1, describe(result)
            assert all(part in result.stdout for part in parts), describe(result)
            assert "Traceback" not in result.stdout + result.stderr, describe(result)
        else:
            assert_one_line_error(result, 2, *parts)


def test_unreachable_database_at_startup_is_one_line_naming_the_masked_url() -> None:
    base = {"PGREACT_HANDLERS": "handlers.effects", "PGREACT_HTTP_PORT": "0"}
    unknown_host = f"postgresql+psycopg://app:{PASSWORD}@no-such-host.invalid:5432/app"
    bad_port = UNREACHABLE
    results = run_all(
        [
            Call(["run"], {**base, "PGREACT_DATABASE_URL": unknown_host}),
            Call(
                ["run"],
                {**base, "PGREACT_DATABASE_URL": unknown_host.replace("psycopg", "asyncpg")},
            ),
            Call(["run"], {**base, "PGREACT_DATABASE_URL": bad_port}),
            Call(["install"], {**base, "PGREACT_DATABASE_URL": bad_port}),
            Call(["status"], {**base, "PGREACT_DATABASE_URL": unknown_host}),
            Call(["dead", "list"], {**base, "PGREACT_DATABASE_URL": bad_port}),
        ]
    )
    for result in results:
        assert_one_line_error(result, 1, ":***@", "(PGREACT_DATABASE_URL)")
    assert "no-such-host.invalid" in results[0].stderr
    assert "127.0.0.1:9" in results[2].stderr


def test_unknown_pgreact_variables_are_warned_about() -> None:
    env = {
        "PGREACT_DATABASE_URL": UNREACHABLE,
        "PGREACT_HANDLERS": "handlers.effects",
        "PGREACT_POOL_SIZ": "3",
    }
    result = cli("status", env=env)
    assert result.returncode == 1, describe(result)
    assert (
        "pgreact: warning: PGREACT_POOL_SIZ is not a pgreact setting and is ignored "
        "(did you mean PGREACT_POOL_SIZE?)" in result.stderr
    ), describe(result)


def test_run_warns_about_a_capped_concurrency_and_a_port_in_use_is_one_line(
    pg_dsn: str, sa_url: str, driver: str
) -> None:
    setup_installed(pg_dsn, sa_url)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        env = db_env(pg_dsn, driver, PGREACT_HTTP_PORT=str(port), PGREACT_CONCURRENCY="12")
        result = cli("run", env=env)
    finally:
        holder.close()
    assert_one_line_error(
        result, 1, f"cannot listen on 127.0.0.1:{port}", "PGREACT_HTTP_PORT", "in use"
    )
    warning = [line for line in result.stderr.splitlines() if '"configuration"' in line]
    assert warning and "PGREACT_CONCURRENCY=12 is capped at 9" in warning[0], describe(result)


# -- passwords: wrong ones, and separate credentials (issue 13 item 4) -------------------------

RIGHT_PASSWORD = "Right pw@%'\\x"


@pytest.fixture
def password_role(pg_server: Any, pg_dsn: str) -> Iterator[str]:
    """A role that must give its password (scram), on the session server: pg_hba.conf gets a
    line for this role alone, so every other test keeps trust authentication."""
    role = f"pw_{os.getpid()}_{abs(hash(pg_dsn)) % 10**6}"
    (hba,) = sql(pg_dsn, "SHOW hba_file")[0]
    path = Path(hba)
    if not path.is_file() or not os.access(path, os.W_OK):
        pytest.skip("the server's pg_hba.conf is not on this machine (docker or remote server)")
    original = path.read_text()
    literal = "'" + RIGHT_PASSWORD.replace("'", "''") + "'"
    sql(pg_dsn, f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD {literal}")
    lines = "".join(f"host all {role} {net} scram-sha-256\n" for net in ("127.0.0.1/32", "::1/128"))
    path.write_text(lines + original)
    sql(pg_dsn, "SELECT pg_reload_conf()")
    try:
        yield role
    finally:
        path.write_text(original)
        sql(pg_dsn, "SELECT pg_reload_conf()")
        sql(pg_dsn, f"DROP ROLE IF EXISTS {role}")


def role_url(pg_dsn: str, role: str, password: str | None = None) -> str:
    """pg_dsn as ``role`` (with ``password`` if given), as a plain postgresql:// URL."""
    url = make_url(pg_dsn).set(username=role, password=password)
    return url.render_as_string(hide_password=False)


def test_wrong_password_is_one_line_for_both_drivers(
    pg_dsn: str, sa_url: str, password_role: str
) -> None:
    setup_installed(pg_dsn, sa_url)
    calls = []
    for driver in DRIVERS:
        env = db_env(pg_dsn, driver)
        env["PGREACT_DATABASE_URL"] = to_sa_url(role_url(pg_dsn, password_role, PASSWORD), driver)
        calls += [Call(["run"], env), Call(["install"], env), Call(["status"], env)]
    for result in run_all(calls):
        assert_one_line_error(result, 1, "password authentication failed", password_role)
        assert len(result.stderr.strip().splitlines()) <= 3, describe(result)


def test_plain_url_with_pgpassword_or_passfile_reaches_both_drivers(
    pg_dsn: str, sa_url: str, password_role: str, tmp_path: Path
) -> None:
    setup_installed(pg_dsn, sa_url)
    plain = role_url(pg_dsn, password_role)  # postgresql://role@host:port/db, no password
    parsed = make_url(plain)
    passfile = tmp_path / "pgpass"
    escaped = RIGHT_PASSWORD.replace("\\", "\\\\").replace(":", "\\:")
    passfile.write_text(f"{parsed.host}:{parsed.port}:*:{password_role}:{escaped}\n")
    passfile.chmod(0o600)
    calls = []
    for listener in DRIVERS:
        base = {
            "PGREACT_DATABASE_URL": plain,  # as an operator's Secret gives it: no +driver
            "PGREACT_LISTENER": listener,
            "PGREACT_HANDLERS": "handlers.effects",
        }
        calls += [
            Call(["status", "--json"], {**base, "PGPASSWORD": RIGHT_PASSWORD}),
            Call(["status", "--json"], {**base, "PGPASSFILE": str(passfile)}),
            Call(["check"], {**base, "PGPASSWORD": RIGHT_PASSWORD, "PGREACT_HTTP_PORT": "0"}),
        ]
    results = run_all(calls)
    for call, result in zip(calls, results, strict=True):
        assert RIGHT_PASSWORD not in result.stdout + result.stderr
        assert result.returncode == 0, f"{call.env}\n{describe(result)}"
        if call.args[0] == "check":
            assert f"postgresql+{call.env['PGREACT_LISTENER']}://" in result.stdout


# -- dead letters an on-call engineer can work with (issue 13 item 8) --------------------------


def kill_some(pg_dsn: str) -> None:
    sql(pg_dsn, "INSERT INTO source SELECT g, g FROM generate_series(1, 4) g")
    sql(pg_dsn, "UPDATE source SET v = 100 WHERE id = 2")
    sql(
        pg_dsn,
        "UPDATE pgreact.queue SET dead_at = now() - interval '2 hours 5 minutes 3 seconds',"
        " failed_at = now() - interval '2 hours 5 minutes 3 seconds', attempts = 10,"
        " last_error = E'RuntimeError: refusing\\nTraceback (most recent call last):\\n"
        '  File "h.py", line 3, in handle\\nRuntimeError: refusing\''
        " WHERE handler = 'single' AND row_key = '2'",
    )


def test_dead_show_prints_everything_and_names_unknown_ids(
    pg_dsn: str, sa_url: str, driver: str
) -> None:
    setup_installed(pg_dsn, sa_url)
    kill_some(pg_dsn)
    dead_ids = delivery_ids(pg_dsn, "dead_at IS NOT NULL")
    assert len(dead_ids) == 2  # the INSERT and the UPDATE of key 2
    (live_id, *_) = delivery_ids(pg_dsn, "dead_at IS NULL")
    env = db_env(pg_dsn, driver)
    shown, as_json, unknown, listed, status = run_all(
        [
            Call(["dead", "show", *map(str, dead_ids)], env),
            Call(["dead", "show", str(dead_ids[1]), "--json"], env),
            Call(["dead", "show", str(dead_ids[0]), "999999", str(live_id)], env),
            Call(["dead", "list"], env),
            Call(["status"], env),
        ]
    )
    assert shown.returncode == 0, describe(shown)
    text = shown.stdout
    assert f"dead letter {dead_ids[0]}: handler single, INSERT on public.source" in text
    assert f"dead letter {dead_ids[1]}: handler single, UPDATE on public.source" in text
    assert '"v":100' in text and '"v":2' in text  # new and old row images
    assert "attempts:   10" in text
    assert 'File "h.py", line 3, in handle' in text  # the full error, traceback included
    assert "(2h 5m ago)" in text

    (letter,) = json.loads(as_json.stdout)
    assert letter["new"] == {"id": 2, "v": 100, "payload": None}
    assert letter["old"] == {"id": 2, "v": 2, "payload": None}
    assert letter["last_error"].count("\n") == 3
    assert letter["failed_at"] is not None and 7500 < letter["dead_for_seconds"] < 7600

    assert_one_line_error(unknown, 1, "999999", str(live_id), "see `pgreact dead list`")
    assert str(dead_ids[0]) not in unknown.stderr.split("ID", 1)[1].split("(")[0]

    assert listed.returncode == 0, describe(listed)
    assert listed.stdout.splitlines()[0].split()[:7] == [
        "id", "handler", "table", "op", "key", "attempts", "dead",
    ]  # fmt: skip
    assert "2h 5m" in listed.stdout
    assert status.returncode == 0, describe(status)
    oldest = {line.split()[0]: line.split()[4:] for line in status.stdout.splitlines()[1:]}
    assert re.fullmatch(r"\d+(\.\d)?s", oldest["batch"][0]), status.stdout


def test_dead_retry_and_purge_refuse_unknown_ids_and_change_nothing(
    pg_dsn: str, sa_url: str, driver: str
) -> None:
    setup_installed(pg_dsn, sa_url)
    kill_some(pg_dsn)
    dead_ids = delivery_ids(pg_dsn, "dead_at IS NOT NULL")
    (live_id, *_) = delivery_ids(pg_dsn, "dead_at IS NULL")
    env = db_env(pg_dsn, driver)
    retry, purge = run_all(
        [
            Call(["dead", "retry", str(dead_ids[0]), str(live_id)], env),
            Call(["dead", "purge", str(dead_ids[0]), "424242"], env),
        ]
    )
    assert_one_line_error(retry, 1, str(live_id), "nothing was changed")
    assert_one_line_error(purge, 1, "424242", "nothing was changed")
    assert delivery_ids(pg_dsn, "dead_at IS NOT NULL") == dead_ids


def test_dead_purge_all_asks_unless_yes(pg_dsn: str, sa_url: str, driver: str) -> None:
    setup_installed(pg_dsn, sa_url)
    kill_some(pg_dsn)
    env = db_env(pg_dsn, driver)
    # No terminal to ask on (a pipe, as in a script or CI): refuse, purge nothing.
    piped = run_with_stdin(["dead", "purge", "--all"], env, b"y\n", tty=False)
    assert_one_line_error(piped, 1, "--yes", "2 dead letter(s)")
    assert len(delivery_ids(pg_dsn, "dead_at IS NOT NULL")) == 2
    # A terminal: "n" keeps them, "y" purges them.
    declined = run_with_stdin(["dead", "purge", "--all"], env, b"n\n", tty=True)
    assert declined.returncode == 1, describe(declined)
    assert "Delete all 2 dead letter(s)" in declined.stderr
    assert len(delivery_ids(pg_dsn, "dead_at IS NOT NULL")) == 2
    accepted = run_with_stdin(["dead", "purge", "--all"], env, b"y\n", tty=True)
    assert accepted.returncode == 0, describe(accepted)
    assert "2 dead letter(s) purged" in accepted.stdout
    assert delivery_ids(pg_dsn, "dead_at IS NOT NULL") == []


def run_with_stdin(
    args: Sequence[str], env: Mapping[str, str], answer: bytes, *, tty: bool
) -> subprocess.CompletedProcess[str]:
    """The CLI with ``answer`` on its stdin: a pipe, or a pseudo-terminal like a person's."""
    full_env = {**os.environ, **env, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    reader, writer = os.openpty() if tty else os.pipe()
    if tty:
        reader, writer = writer, reader  # openpty gives (controller, terminal)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgreact.cli", *args],
            stdin=reader,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=ROOT,
        )
        os.close(reader)
        os.write(writer, answer)
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(writer)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())
    assert PASSWORD not in result.stdout + result.stderr
    return result


def test_help_texts_are_imperative() -> None:
    texts = run_all(
        [Call(["dead", "--help"], {}), Call(["dead", "purge", "--help"], {}), Call(["--help"], {})]
    )
    shown = "\n".join(t.stdout for t in texts)
    assert all(t.returncode == 0 for t in texts), shown
    for word in ("Requeue", "Delete", "Show", "List", "Run", "Validate"):
        assert re.search(rf"^\s+\S+\s+{word} ", shown, re.MULTILINE), (word, shown)
    assert not re.search(r"^\s+\S+\s+\w+ed ", shown, re.MULTILINE), shown


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (None, "-"),
        (0.04, "0.0s"),
        (3.25, "3.2s"),
        (42.9, "42s"),
        (192, "3m 12s"),
        (7503, "2h 5m"),
        (3 * 86400 + 4 * 3600 + 5, "3d 4h"),
    ],
)
def test_human_age(seconds: float | None, shown: str) -> None:
    from pgreact.cli import human_age

    assert human_age(seconds) == shown


def test_check_warns_about_a_capped_concurrency_and_misspelt_variables(
    pg_dsn: str, sa_url: str, driver: str
) -> None:
    setup_installed(pg_dsn, sa_url)
    env = db_env(pg_dsn, driver, PGREACT_CONCURRENCY="12", PGREACT_BATCH_SIZ="5")
    result = cli("check", env=env)
    assert result.returncode == 0, describe(result)  # warnings only
    warned = [line for line in result.stdout.splitlines() if line.startswith("[WARN] settings:")]
    assert len(warned) == 2, describe(result)
    assert "PGREACT_CONCURRENCY=12 is capped at 9" in result.stdout
    assert "PGREACT_BATCH_SIZ is not a pgreact setting" in result.stdout
    assert "did you mean PGREACT_BATCH_SIZE?" in result.stdout
    assert "pgreact: warning:" not in result.stderr  # reported once, in the check's report
