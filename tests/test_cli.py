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
import subprocess
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import to_sa_url

from tests.handlers.effects import router as effects_router
from tests.support import (
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

    # Purge exactly one dead letter; a live delivery named alongside is left alone.
    (purged_id,) = delivery_ids(pg_dsn, "handler = 'single' AND row_key = '1'")
    (live_id,) = delivery_ids(pg_dsn, "handler = 'single' AND row_key = '5'")
    purge = await anyio.to_thread.run_sync(
        lambda: cli("dead", "purge", str(purged_id), str(live_id), env=env)
    )
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
    purge_all = cli("dead", "purge", "--all", env=db_env(pg_dsn, driver))
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
