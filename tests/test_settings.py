"""Settings: contract defaults, PGREACT_* parsing, TOML overrides, and error messages that name
the variable to fix. Unit tests: no database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from pgreact.errors import ConfigError, PgreactError
from pgreact.settings import Settings, load_settings, mask_url

ASYNCPG_URL = "postgresql+asyncpg://app:s3cr3t@db.example:5432/app"
PSYCOPG_URL = "postgresql+psycopg://app:s3cr3t@db.example:5432/app"


def load(environ: dict[str, str] | None = None, config: Path | None = None) -> Settings:
    return load_settings(config, environ=environ or {})


def toml(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "pgreact.toml"
    path.write_text(body, encoding="utf-8")
    return path


# -- defaults ---------------------------------------------------------------------------------

CONTRACT_DEFAULTS: dict[str, Any] = {
    "database_url": None,
    "listen_url": None,
    "listener": None,
    "schema_name": "pgreact",
    "pool_size": 10,
    "max_overflow": 5,
    "pool_timeout": 30,
    "pool_recycle": 1800,
    "pool_pre_ping": True,
    "pooler": "none",
    "concurrency": 9,  # PGREACT_POOL_SIZE - 1: the one rule (see test_concurrency_rule)
    "batch_size": 100,
    "max_attempts": 10,
    "retry_base": 1,
    "retry_max": 300,
    "handler_timeout": 30,
    "sweep_interval": 5,
    "http_host": "0.0.0.0",  # noqa: S104 - the contract's default
    "http_port": 9000,
    "log_format": "json",
    "log_level": "INFO",
    "shutdown_timeout": 25,
    "replicas": 1,
}


def test_defaults_match_the_contract_table() -> None:
    settings = load()
    actual = {name: getattr(settings, name) for name in CONTRACT_DEFAULTS}
    assert actual == CONTRACT_DEFAULTS
    assert settings.handler_modules == []


def test_settings_are_frozen() -> None:
    settings = load({"PGREACT_DATABASE_URL": ASYNCPG_URL})
    with pytest.raises(ValueError, match="frozen"):
        settings.pool_size = 3  # type: ignore[misc]


def test_the_caller_environment_is_left_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGREACT_POOL_SIZE", "7")
    # An explicit environ replaces os.environ for the call, then os.environ is restored.
    assert load_settings(None, environ={}).pool_size == 10
    assert load_settings(None).pool_size == 7
    import os

    assert os.environ["PGREACT_POOL_SIZE"] == "7"


# -- environment ------------------------------------------------------------------------------


def test_environment_variables_are_parsed() -> None:
    settings = load(
        {
            "PGREACT_DATABASE_URL": ASYNCPG_URL,
            "PGREACT_LISTEN_URL": "postgresql://app:s3cr3t@db-direct:5432/app",
            "PGREACT_LISTENER": "psycopg",
            "PGREACT_HANDLERS": " myapp.handlers , myapp.audit ,,",
            "PGREACT_SCHEMA": "events",
            "PGREACT_POOL_SIZE": "20",
            "PGREACT_MAX_OVERFLOW": "0",
            "PGREACT_POOL_TIMEOUT": "2.5",
            "PGREACT_POOL_RECYCLE": "-1",
            "PGREACT_POOL_PRE_PING": "false",
            "PGREACT_POOLER": "pgbouncer-transaction",
            "PGREACT_CONCURRENCY": "4",
            "PGREACT_BATCH_SIZE": "500",
            "PGREACT_MAX_ATTEMPTS": "3",
            "PGREACT_RETRY_BASE": "0.5",
            "PGREACT_RETRY_MAX": "60",
            "PGREACT_HANDLER_TIMEOUT": "12",
            "PGREACT_SWEEP_INTERVAL": "0.25",
            "PGREACT_HTTP_HOST": "127.0.0.1",
            "PGREACT_HTTP_PORT": "9100",
            "PGREACT_LOG_FORMAT": "console",
            "PGREACT_LOG_LEVEL": "debug",
            "PGREACT_SHUTDOWN_TIMEOUT": "0",
            "PGREACT_REPLICAS": "3",
        }
    )
    assert settings.database_url == ASYNCPG_URL
    assert settings.listen_url == "postgresql://app:s3cr3t@db-direct:5432/app"
    assert settings.listener == "psycopg"
    assert settings.handler_modules == ["myapp.handlers", "myapp.audit"]
    assert settings.require_handlers() == ["myapp.handlers", "myapp.audit"]
    assert settings.schema_name == "events"
    assert (settings.pool_size, settings.max_overflow, settings.pool_recycle) == (20, 0, -1)
    assert settings.pool_timeout == 2.5
    assert settings.pool_pre_ping is False
    assert settings.pooler == "pgbouncer-transaction"
    assert (settings.concurrency, settings.batch_size, settings.max_attempts) == (4, 500, 3)
    assert (settings.retry_base, settings.retry_max) == (0.5, 60)
    assert (settings.handler_timeout, settings.sweep_interval) == (12, 0.25)
    assert (settings.http_host, settings.http_port) == ("127.0.0.1", 9100)
    assert (settings.log_format, settings.log_level) == ("console", "DEBUG")
    assert (settings.shutdown_timeout, settings.replicas) == (0, 3)


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("true", True), ("0", False)])
def test_booleans_accept_the_usual_spellings(raw: str, expected: bool) -> None:
    assert load({"PGREACT_POOL_PRE_PING": raw}).pool_pre_ping is expected


# -- TOML -------------------------------------------------------------------------------------


def test_toml_overrides_the_environment_in_both_key_styles(tmp_path: Path) -> None:
    config = toml(
        tmp_path,
        'pool_size = 20\nPGREACT_MAX_OVERFLOW = 7\nschema = "from_toml"\n'
        'PGREACT_LISTENER = "psycopg"\nhandlers = "a.b,c.d"\n',
    )
    environ = {
        "PGREACT_DATABASE_URL": ASYNCPG_URL,
        "PGREACT_POOL_SIZE": "5",
        "PGREACT_MAX_OVERFLOW": "1",
        "PGREACT_SCHEMA": "from_env",
        "PGREACT_LISTENER": "asyncpg",
        "PGREACT_CONCURRENCY": "3",  # not in the file: the environment still counts
    }
    settings = load(environ, config)
    assert settings.pool_size == 20
    assert settings.max_overflow == 7
    assert settings.schema_name == "from_toml"
    assert settings.listener == "psycopg"
    assert settings.handler_modules == ["a.b", "c.d"]
    assert settings.concurrency == 3
    assert settings.database_url == ASYNCPG_URL


def test_toml_key_for_the_schema_by_variable_name(tmp_path: Path) -> None:
    config = toml(tmp_path, 'PGREACT_SCHEMA = "tenant_a"\n')
    assert load({"PGREACT_SCHEMA": "other"}, config).schema_name == "tenant_a"


def test_unknown_toml_key_is_named(tmp_path: Path) -> None:
    config = toml(tmp_path, "pool_size = 3\npool_sise = 4\n")
    with pytest.raises(ConfigError, match="pool_sise") as info:
        load({}, config)
    assert info.value.exit_code == 2


def test_invalid_toml_value_names_the_variable(tmp_path: Path) -> None:
    config = toml(tmp_path, 'pool_size = "many"\n')
    with pytest.raises(ConfigError, match="PGREACT_POOL_SIZE"):
        load({}, config)


@pytest.mark.parametrize(
    ("body", "fragment"), [(None, "does not exist"), ("pool_size = \n", "cannot read")]
)
def test_missing_or_broken_toml_file(tmp_path: Path, body: str | None, fragment: str) -> None:
    path = tmp_path / "pgreact.toml"
    if body is not None:
        path.write_text(body)
    with pytest.raises(ConfigError, match=fragment) as info:
        load({}, path)
    assert str(path) in str(info.value)


# -- invalid values ---------------------------------------------------------------------------

INVALID: list[tuple[str, str]] = [
    ("PGREACT_POOL_SIZE", "abc"),
    ("PGREACT_POOL_SIZE", "0"),
    ("PGREACT_MAX_OVERFLOW", "-1"),
    ("PGREACT_POOL_TIMEOUT", "0"),
    ("PGREACT_POOL_RECYCLE", "soon"),
    ("PGREACT_POOL_PRE_PING", "maybe"),
    ("PGREACT_POOLER", "pgbouncer"),
    ("PGREACT_CONCURRENCY", "0"),
    ("PGREACT_BATCH_SIZE", "0"),
    ("PGREACT_MAX_ATTEMPTS", "0"),
    ("PGREACT_RETRY_BASE", "0"),
    ("PGREACT_RETRY_MAX", "-5"),
    ("PGREACT_HANDLER_TIMEOUT", "0"),
    ("PGREACT_SWEEP_INTERVAL", "never"),
    ("PGREACT_HTTP_PORT", "70000"),
    ("PGREACT_HTTP_PORT", "http"),
    ("PGREACT_LOG_FORMAT", "xml"),
    ("PGREACT_LOG_LEVEL", "loud"),
    ("PGREACT_SHUTDOWN_TIMEOUT", "-1"),
    ("PGREACT_REPLICAS", "0"),
    ("PGREACT_LISTENER", "nope"),
    ("PGREACT_SCHEMA", "Bad-Name"),
    ("PGREACT_SCHEMA", "drop table x;"),
    ("PGREACT_DATABASE_URL", "mysql://app@db/app"),
    ("PGREACT_LISTEN_URL", "http://db:5432/app"),
]


@pytest.mark.parametrize(("variable", "value"), INVALID, ids=[f"{v}={x}" for v, x in INVALID])
def test_invalid_value_names_the_variable(variable: str, value: str) -> None:
    environ = {"PGREACT_DATABASE_URL": ASYNCPG_URL, variable: value}
    with pytest.raises(ConfigError) as info:
        load(environ)
    message = str(info.value)
    assert variable in message
    assert info.value.exit_code == 2
    assert "s3cr3t" not in message


def test_several_invalid_values_are_all_reported() -> None:
    with pytest.raises(ConfigError) as info:
        load({"PGREACT_POOL_SIZE": "x", "PGREACT_LISTENER": "y", "PGREACT_LOG_FORMAT": "z"})
    for variable in ("PGREACT_POOL_SIZE", "PGREACT_LISTENER", "PGREACT_LOG_FORMAT"):
        assert variable in str(info.value)


def test_retry_max_below_retry_base_names_both() -> None:
    with pytest.raises(ConfigError) as info:
        load({"PGREACT_RETRY_BASE": "10", "PGREACT_RETRY_MAX": "5"})
    assert "PGREACT_RETRY_MAX" in str(info.value)
    assert "PGREACT_RETRY_BASE" in str(info.value)


@pytest.mark.parametrize(
    "url", ["postgresql+asyncpg://app@db:notaport/app", "postgresql+psycopg://app@db:5x/app"]
)
def test_malformed_database_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="PGREACT_DATABASE_URL"):
        load({"PGREACT_DATABASE_URL": url})


def test_database_url_is_required_only_when_asked_for() -> None:
    settings = load()  # `demo` runs without one
    with pytest.raises(ConfigError, match="PGREACT_DATABASE_URL") as info:
        settings.require_database_url()
    assert "postgresql+asyncpg://" in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("handlers", ["", " , ,"])
def test_handlers_are_required_only_when_asked_for(handlers: str) -> None:
    settings = load({"PGREACT_HANDLERS": handlers})
    with pytest.raises(ConfigError, match="PGREACT_HANDLERS"):
        settings.require_handlers()


def test_config_errors_are_pgreact_errors() -> None:
    assert issubclass(ConfigError, PgreactError)


# -- derived values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "write", "listener", "listen_dsn"),
    [
        # No listen URL: everything follows the database URL.
        ({"PGREACT_DATABASE_URL": ASYNCPG_URL}, "asyncpg", "asyncpg", "db.example"),
        ({"PGREACT_DATABASE_URL": PSYCOPG_URL}, "psycopg", "psycopg", "db.example"),
        # A listen URL naming its driver decides the listener.
        (
            {
                "PGREACT_DATABASE_URL": ASYNCPG_URL,
                "PGREACT_LISTEN_URL": "postgresql+psycopg://app@direct:5432/app",
            },
            "asyncpg",
            "psycopg",
            "direct",
        ),
        # A plain libpq listen URL: the listener follows the database URL's driver.
        (
            {
                "PGREACT_DATABASE_URL": PSYCOPG_URL,
                "PGREACT_LISTEN_URL": "postgresql://app@direct:5432/app",
            },
            "psycopg",
            "psycopg",
            "direct",
        ),
        # An explicit PGREACT_LISTENER wins over both URLs.
        (
            {
                "PGREACT_DATABASE_URL": ASYNCPG_URL,
                "PGREACT_LISTEN_URL": "postgresql+asyncpg://app@direct:5432/app",
                "PGREACT_LISTENER": "psycopg",
            },
            "asyncpg",
            "psycopg",
            "direct",
        ),
        # An empty PGREACT_LISTENER means "not set".
        (
            {"PGREACT_DATABASE_URL": PSYCOPG_URL, "PGREACT_LISTENER": ""},
            "psycopg",
            "psycopg",
            "db.example",
        ),
    ],
)
def test_listener_driver_and_listen_dsn(
    environ: dict[str, str], write: str, listener: str, listen_dsn: str
) -> None:
    settings = load(environ)
    assert settings.write_driver == write
    assert settings.listener_driver == listener
    # The listen DSN is plain libpq form (both drivers accept it), pointing at the right host.
    assert settings.listen_dsn.startswith("postgresql://")
    assert f"@{listen_dsn}:5432/app" in settings.listen_dsn


# -- masking ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("postgresql+asyncpg://app:s3cr3t@db:5432/app", "s3cr3t"),
        ("postgresql://app:p%40ss%3Aw0rd@db/app", "p%40ss%3Aw0rd"),
        ("postgresql+psycopg://app:with:colon@db/app?sslmode=require", "with:colon"),
        ("postgresql://:only-password@db/app", "only-password"),
    ],
)
def test_mask_url_hides_the_password(url: str, secret: str) -> None:
    masked = mask_url(url)
    assert secret not in masked
    assert "***" in masked
    assert "@db" in masked  # the rest stays readable


@pytest.mark.parametrize(
    "url", ["postgresql+asyncpg://app@db:5432/app", "postgresql://db/app?sslmode=require"]
)
def test_mask_url_leaves_urls_without_password_alone(url: str) -> None:
    assert mask_url(url) == url


def test_mask_url_hides_a_password_query_parameter() -> None:
    masked = mask_url("postgresql+asyncpg://app@db:5432/app?sslmode=require&password=s3cr3t")
    assert "s3cr3t" not in masked
    assert "sslmode=require" in masked


@pytest.mark.parametrize(
    ("dsn", "secret"),
    [
        ("host=db user=app password='a tail' dbname=app", "tail"),
        ("host=db password='it\\'s tail' user=app", "tail"),
        ("host=db password = 'x y tail' user=app", "tail"),
        ('host=db password="q1" user=app', "q1"),
        ("postgresql://app:p%40ss%25w0rd@db/app", "ss%25w0rd"),
        ("postgresql://app:p@ss@db/app", "ss"),  # an unescaped @: libpq reads up to the first
        ("postgresql://app:pw@db1:5432,db2:5433/app", "pw@"),
        ("postgresql://app@db/app?sslmode=require&password=a%20b", "a%20b"),
        ("connection to postgresql+psycopg://app:hunter2@db/app failed: refused", "hunter2"),
        ("bad DSN: host=db password='hunter two' (missing '=')", "two"),
    ],
)
def test_mask_url_hides_tricky_passwords(dsn: str, secret: str) -> None:
    masked = mask_url(dsn)
    assert secret not in masked, masked
    assert "***" in masked


@pytest.mark.parametrize(
    ("dsn", "masked", "secret"),
    [
        # SQLAlchemy's make_url accepts all of these unescaped, so they pass validation and are
        # logged at start-up (a space ended the match: the first was shown in full)
        ("postgresql://u:pa ss@h/db", "postgresql://u:***@h/db", "pa ss"),
        ("postgresql+asyncpg://u:aa bb@h:5432/db?sslmode=require", None, "aa bb"),
        ("postgresql://u:sp ace@and@at@h/db", "postgresql://u:***@h/db", "sp ace@and@at"),
        ("postgresql://u:@lead ing@h/db", "postgresql://u:***@h/db", "@lead ing"),
        ("postgresql://u:it's quiet@h/db", "postgresql://u:***@h/db", "it's quiet"),
        ('postgresql://u:"quo ted"@h/db', "postgresql://u:***@h/db", '"quo ted"'),
        ("postgresql://u:slash/in?mark@h/db", "postgresql://u:***@h/db", "slash/in?mark"),
        ("postgresql://app@corp:az ure@h/db", "postgresql://app@corp:***@h/db", "az ure"),
        ("postgresql://u@h/db?password=sp ace&sslmode=require", None, "sp ace"),
        (
            "host=h user=u password='sp ace' dbname=db",
            "host=h user=u password=*** dbname=db",
            "sp ace",
        ),
        ("host=h password='it\\'s sp ace' user=u", "host=h password=*** user=u", "it's sp ace"),
        # quoted in a message; two URLs on one line
        ("bad URL 'postgresql://u:pa ss@h/db' (ValueError)", None, "pa ss"),
        ("from postgresql://a:one two@h/db to postgresql://b:three four@h/db", None, "one three"),
    ],
)
def test_mask_url_hides_passwords_with_spaces_and_at_signs(
    dsn: str, masked: str | None, secret: str
) -> None:
    """No word of the password shows, however SQLAlchemy or libpq would cut it."""
    shown = mask_url(dsn)
    if masked is not None:
        assert shown == masked
    for word in secret.replace("@", " ").replace("/", " ").replace("?", " ").split():
        assert word.strip("'\"") not in shown, (word, shown)
    if dsn.startswith("postgresql"):  # a whole URL: what SQLAlchemy reads is in ``secret``
        assert (make_url(dsn).password or "") in secret
        assert make_url(shown).database == "db"  # and the rest stays readable


def test_mask_url_is_the_listener_masking_function() -> None:
    from pgreact.listeners.dsn import mask_dsn

    for dsn in ("host=db password='a b'", "postgresql://u:p@h/d"):
        assert mask_url(dsn) == mask_dsn(dsn)


# -- plain URLs and separate credentials (Kubernetes Secrets) -----------------------------------

PLAIN_URL = "postgresql://app@db.example:5432/app"


@pytest.mark.parametrize(
    ("environ", "driver"),
    [
        ({"PGREACT_DATABASE_URL": PLAIN_URL}, "asyncpg"),
        ({"PGREACT_DATABASE_URL": "postgres://app@db.example:5432/app"}, "asyncpg"),
        ({"PGREACT_DATABASE_URL": PLAIN_URL, "PGREACT_LISTENER": "psycopg"}, "psycopg"),
    ],
)
def test_plain_postgresql_url_takes_the_listener_driver_or_asyncpg(
    environ: dict[str, str], driver: str
) -> None:
    settings = load(environ)
    assert settings.write_driver == driver
    assert settings.listener_driver == driver
    assert settings.require_database_url() == f"postgresql+{driver}://app@db.example:5432/app"
    assert settings.listen_dsn == "postgresql://app@db.example:5432/app"


def test_pgpassword_reaches_both_urls_and_the_url_password_wins() -> None:
    settings = load(
        {
            "PGREACT_DATABASE_URL": PLAIN_URL,
            "PGREACT_LISTEN_URL": "postgresql://app@direct:5432/app",
            "PGPASSWORD": "p@ss w'rd%",
        }
    )
    from sqlalchemy.engine import make_url

    assert make_url(settings.require_database_url()).password == "p@ss w'rd%"
    assert make_url(settings.listen_dsn).password == "p@ss w'rd%"
    assert make_url(settings.listen_dsn).host == "direct"
    import psycopg

    # libpq itself (the psycopg listener) reads it back: a raw space would be refused.
    assert psycopg.conninfo.conninfo_to_dict(settings.listen_dsn)["password"] == "p@ss w'rd%"
    assert "p@ss" not in mask_url(settings.require_database_url())
    own = load({"PGREACT_DATABASE_URL": ASYNCPG_URL, "PGPASSWORD": "other"})
    assert own.require_database_url() == ASYNCPG_URL


def test_password_file_is_read_the_libpq_way(tmp_path: Path) -> None:
    passfile = tmp_path / "pgpass"
    passfile.write_text(
        "# comment\n"
        "other:5432:app:app:wrong\n"
        "db.example:5432:*:app:from\\:file\\\\x\n"
        "*:*:*:*:fallback\n"
    )
    passfile.chmod(0o600)
    from sqlalchemy.engine import make_url

    environ = {"PGREACT_DATABASE_URL": PLAIN_URL, "PGPASSFILE": str(passfile)}
    assert make_url(load(environ).require_database_url()).password == "from:file\\x"
    elsewhere = {**environ, "PGREACT_DATABASE_URL": "postgresql://app@db2/app"}
    assert make_url(load(elsewhere).require_database_url()).password == "fallback"
    # PGPASSWORD wins over the file; a file others can read is ignored (as libpq does).
    assert make_url(load({**environ, "PGPASSWORD": "env"}).listen_dsn).password == "env"
    passfile.chmod(0o644)
    assert make_url(load(environ).require_database_url()).password is None


def test_a_password_file_others_can_read_is_ignored_with_a_warning(tmp_path: Path) -> None:
    """libpq warns when it passes over such a file (a Kubernetes Secret volume is 0644 by
    default); pgreact passed over it in silence, leaving an authentication failure to puzzle
    over."""
    passfile = tmp_path / "pgpass"
    passfile.write_text("*:*:*:*:from-file\n")
    passfile.chmod(0o644)
    listen = "postgresql://app@listen.example/app"
    environ = {
        "PGREACT_DATABASE_URL": PLAIN_URL,
        "PGREACT_LISTEN_URL": listen,  # the file is consulted twice, the warning given once
        "PGPASSFILE": str(passfile),
    }
    settings = load(environ)
    assert make_url(settings.require_database_url()).password is None
    (warning,) = settings.config_warnings()
    assert repr(str(passfile)) in warning and "PGPASSFILE" in warning
    assert "mode is 0644" in warning
    assert "chmod 600" in warning and "defaultMode: 0600" in warning
    # Not consulted (a password in the URL, PGPASSWORD) or fine: nothing to say.
    assert (
        load({**environ, "PGREACT_LISTEN_URL": ASYNCPG_URL, "PGPASSWORD": "x"}).config_warnings()
        == []
    )
    assert (
        load(
            {**environ, "PGREACT_DATABASE_URL": ASYNCPG_URL, "PGREACT_LISTEN_URL": ASYNCPG_URL}
        ).config_warnings()
        == []
    )
    passfile.chmod(0o600)
    fine = load(environ)
    assert fine.config_warnings() == []
    assert make_url(fine.require_database_url()).password == "from-file"


@pytest.mark.parametrize("kind", ["directory", "missing"])
def test_a_password_file_that_is_no_file_is_warned_about(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "pgpass"
    if kind == "directory":
        path.mkdir()
    (warning,) = load(
        {"PGREACT_DATABASE_URL": PLAIN_URL, "PGPASSFILE": str(path)}
    ).config_warnings()
    assert repr(str(path)) in warning
    assert ("not a plain file" if kind == "directory" else "does not exist") in warning


# -- warnings ---------------------------------------------------------------------------------


def test_unknown_pgreact_variables_are_warned_about_with_the_closest_name() -> None:
    settings = load(
        {
            "PGREACT_POOL_SIZ": "3",
            "PGREACT_HANDLER_TIMOUT": "5",
            "PGREACT_ZZZ": "1",
            # not settings, and not typos: Kubernetes service links, the test suite's own
            "PGREACT_SERVICE_HOST": "10.0.0.1",
            "PGREACT_PORT_9000_TCP": "tcp://10.0.0.1:9000",
            "PGREACT_PORT": "tcp://10.0.0.1:9000",
            "PGREACT_TEST_DATABASE_URL": "x",
            "PGREACT_POOL_SIZE": "4",
        }
    )
    warnings = settings.config_warnings()
    assert len(warnings) == 3, warnings
    assert any("PGREACT_POOL_SIZ " in w and "did you mean PGREACT_POOL_SIZE" in w for w in warnings)
    assert any("did you mean PGREACT_HANDLER_TIMEOUT" in w for w in warnings)
    assert any(w.startswith("PGREACT_ZZZ is not a pgreact setting") for w in warnings)


def test_concurrency_rule_one_connection_stays_free() -> None:
    assert load().concurrency == load().handler_concurrency == 9
    assert load().config_warnings() == []
    small = load({"PGREACT_POOL_SIZE": "4"})
    assert (small.concurrency, small.handler_concurrency) == (3, 3)
    assert load({"PGREACT_POOL_SIZE": "1"}).handler_concurrency == 1
    capped = load({"PGREACT_CONCURRENCY": "12"})
    assert (capped.concurrency, capped.handler_concurrency) == (12, 9)
    (warning,) = capped.config_warnings()
    assert "PGREACT_CONCURRENCY=12 is capped at 9" in warning
    assert "PGREACT_POOL_SIZE to 13" in warning
    fits = load({"PGREACT_CONCURRENCY": "12", "PGREACT_POOL_SIZE": "13"})
    assert fits.handler_concurrency == 12 and fits.config_warnings() == []


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PGREACT_HANDLER_TIMEOUT", "inf"),
        ("PGREACT_HANDLER_TIMEOUT", "nan"),
        ("PGREACT_HANDLER_TIMEOUT", "1e300"),
        ("PGREACT_SHUTDOWN_TIMEOUT", "inf"),
        ("PGREACT_POOL_TIMEOUT", "Infinity"),
        ("PGREACT_TCP_KEEPALIVES_IDLE", "99999999"),
        ("PGREACT_TCP_KEEPALIVES_IDLE", "-1"),
    ],
)
def test_values_that_overflow_later_are_config_errors(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable) as info:
        load({variable: value})
    assert info.value.exit_code == 2


def test_toml_is_a_settings_source_and_leaves_os_environ_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    monkeypatch.setenv("PGREACT_BATCH_SIZE", "7")
    before = dict(os.environ)
    config = toml(tmp_path, "pool_size = 3\n")
    settings = load_settings(config, environ={"PGREACT_MAX_OVERFLOW": "2"})
    assert (settings.pool_size, settings.max_overflow, settings.batch_size) == (3, 2, 100)
    assert dict(os.environ) == before
    with pytest.raises(ConfigError, match="did you mean pool_size"):
        load({}, toml(tmp_path, "pool_siz = 3\n"))
