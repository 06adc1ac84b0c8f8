"""One frozen settings object, read from ``PGREACT_*`` variables and optionally a TOML file.

Sources, highest priority first (pydantic-settings sources, see ``settings_customise_sources``):
keyword overrides, the TOML file given with ``--config FILE``, the environment (``os.environ``
or a mapping the caller passes; the process environment is never modified). TOML keys are the
setting names in lower case without the prefix (``pool_size = 20``) or the variable names
(``PGREACT_POOL_SIZE``). Every error names the variable and the fix; the CLI turns it into exit
code 2. Problems that do not stop start-up (a misspelt ``PGREACT_*`` variable, a concurrency the
pool cannot serve) are collected as :meth:`Settings.config_warnings`.

Credentials follow libpq: a password in the URL wins, then ``PGPASSWORD``, then the password
file (``PGPASSFILE``, default ``~/.pgpass``); the one found is handed to both drivers.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.sources.utils import parse_env_vars
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from pgreact.errors import ConfigError
from pgreact.listeners.dsn import libpq_dsn, mask_dsn

ENV_PREFIX = "PGREACT_"
Driver = Literal["asyncpg", "psycopg"]
_URL_DRIVER = re.compile(r"^postgres(?:ql)?\+(asyncpg|psycopg)://", re.IGNORECASE)
_PLAIN_URL = re.compile(r"^postgres(?:ql)?://", re.IGNORECASE)
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
DEFAULT_DRIVER: Driver = "asyncpg"
# Durations end up as server timeouts in milliseconds (a 32-bit int) and as event-loop timers:
# bound them so that `inf` or 1e300 is a configuration error, not an OverflowError at start-up.
MAX_SECONDS = 1_000_000.0
# Linux refuses TCP_KEEPIDLE above 32767 s.
MAX_KEEPALIVE_IDLE = 32_767
# PGREACT_* names that are not settings: the test suite's, the benchmark's, and the variables
# Kubernetes derives from a Service named `pgreact` (PGREACT_SERVICE_HOST, PGREACT_PORT_9000_TCP…).
_NOT_SETTINGS = re.compile(
    r"^PGREACT_(TEST_|CHAOS_|BENCH_|SERVICE_|PORT($|_)|CACHE_DIR$|TMPDIR$|VENV$)"
)

_HINTS: dict[str, str] = {
    "database_url": "set it to a URL such as postgresql+asyncpg://user:pass@host:5432/db or "
    "postgresql+psycopg://… (a plain postgresql:// URL uses the driver of PGREACT_LISTENER, "
    f"else {DEFAULT_DRIVER})",
    "listen_url": "set it to a URL that reaches PostgreSQL directly or through a session-mode "
    "pooler, e.g. postgresql://user:pass@db-host:5432/db",
    "handlers": "set it to comma-separated importable modules, e.g. myapp.handlers,myapp.audit",
    "listener": "use 'asyncpg' or 'psycopg', or leave it unset to follow PGREACT_LISTEN_URL",
    "pooler": "use 'none' or 'pgbouncer-transaction'",
    "log_format": "use 'json' or 'console'",
    "log_level": "use DEBUG, INFO, WARNING or ERROR",
    "schema_name": "use a lower-case identifier such as pgreact",
}


class Settings(BaseSettings):
    """pgreact's configuration. Field ``x`` is read from ``PGREACT_X``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", populate_by_name=True
    )

    database_url: str | None = None
    listen_url: str | None = None
    listener: Driver | None = None
    handlers: str = ""
    schema_name: str = Field(default="pgreact", alias="PGREACT_SCHEMA")

    pool_size: int = Field(default=10, ge=1, le=10_000)
    max_overflow: int = Field(default=5, ge=0, le=10_000)
    pool_timeout: float = Field(default=30.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    pool_recycle: int = Field(default=1800, ge=-1, le=int(MAX_SECONDS))
    pool_pre_ping: bool = True
    pooler: Literal["none", "pgbouncer-transaction"] = "none"

    # One rule: handler transactions in flight <= PGREACT_POOL_SIZE - 1 (one pooled connection
    # stays free for housekeeping and the readiness ping; overflow connections are closed when
    # returned, so they only absorb spikes). Unset, it is exactly that (9 at the defaults).
    concurrency: int = Field(
        default_factory=lambda data: _pool_capacity(data.get("pool_size", 10)), ge=1, le=1024
    )
    batch_size: int = Field(default=100, ge=1, le=10_000)
    max_attempts: int = Field(default=10, ge=1)
    retry_base: float = Field(default=1.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    retry_max: float = Field(default=300.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    handler_timeout: float = Field(default=30.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    sweep_interval: float = Field(default=5.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)

    http_host: str = "0.0.0.0"  # noqa: S104 - a pod must be scrapable on its pod IP
    http_port: int = Field(default=9000, ge=0, le=65535)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    shutdown_timeout: float = Field(default=25.0, ge=0, le=MAX_SECONDS, allow_inf_nan=False)
    replicas: int = Field(default=1, ge=1)

    # Beyond the contract: documented in the README's configuration table.
    heartbeat_interval: float = Field(default=5.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    heartbeat_timeout: float = Field(default=5.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    connect_timeout: float = Field(default=10.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    stats_interval: float = Field(default=5.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    # asyncpg's client-side statement limit; default handler timeout + 2
    command_timeout: float | None = Field(default=None, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    tcp_keepalives_idle: int = Field(default=60, ge=0, le=MAX_KEEPALIVE_IDLE)  # 0: off
    application_name: str = "pgreact"

    # Resolved by load_settings: the password of each URL (libpq rules) and what to warn about.
    _passwords: dict[str, str] = PrivateAttr(default_factory=dict)
    _unknown: list[str] = PrivateAttr(default_factory=list)
    _credential_notes: list[str] = PrivateAttr(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        where = _SOURCES.get() or _Where()
        sources: list[PydanticBaseSettingsSource] = [init_settings]
        if where.config_file is not None:
            sources.append(_TomlSource(settings_cls, where.config_file))
        sources.append(_EnvSource(settings_cls, where.environ))
        return tuple(sources)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("listener", mode="before")
    @classmethod
    def _empty_listener(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("schema_name")
    @classmethod
    def _schema_ident(cls, value: str) -> str:
        if not _IDENT.match(value):
            raise ValueError("must be a lower-case SQL identifier (letters, digits, _)")
        return value

    @field_validator("database_url", "listen_url")
    @classmethod
    def _url_shape(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not (_URL_DRIVER.match(value) or _PLAIN_URL.match(value)):
            raise ValueError("is not a postgresql:// URL")
        try:
            parsed = make_url(value)
            _ = parsed.port  # a non-numeric port only fails when read
        except (ArgumentError, ValueError) as exc:
            raise ValueError(f"is not a valid URL ({mask_url(str(exc))})") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.retry_max < self.retry_base:
            raise ValueError(
                "PGREACT_RETRY_MAX must be at least PGREACT_RETRY_BASE: raise PGREACT_RETRY_MAX"
            )
        return self

    # -- derived values -------------------------------------------------------------------

    @property
    def handler_modules(self) -> list[str]:
        return [m.strip() for m in self.handlers.split(",") if m.strip()]

    @property
    def write_driver(self) -> Driver:
        """The driver named by PGREACT_DATABASE_URL; for a plain ``postgresql://`` URL (an
        operator-generated Secret) PGREACT_LISTENER's, else :data:`DEFAULT_DRIVER`."""
        url = self._given_database_url()
        if _URL_DRIVER.match(url):
            return _driver_of(url)
        return self.listener or DEFAULT_DRIVER

    @property
    def effective_listen_url(self) -> str:
        """The listen URL (PGREACT_DATABASE_URL's by default) with its resolved password."""
        if self.listen_url:
            return self._with_password(self.listen_url)
        return self.require_database_url()

    @property
    def listener_driver(self) -> Driver:
        if self.listener is not None:
            return self.listener
        if self.listen_url and _URL_DRIVER.match(self.listen_url):
            return _driver_of(self.listen_url)
        return self.write_driver

    @property
    def listen_dsn(self) -> str:
        """The listen URL in plain libpq form, as both drivers accept it."""
        return libpq_url(self.effective_listen_url)

    @property
    def handler_concurrency(self) -> int:
        """Handler transactions in flight: PGREACT_CONCURRENCY, at most PGREACT_POOL_SIZE - 1."""
        return min(self.concurrency, _pool_capacity(self.pool_size))

    def config_warnings(self) -> list[str]:
        """What start-up and ``pgreact check`` warn about: settings that do not stop pgreact
        but do not do what they say."""
        notes = [*self._unknown, *self._credential_notes]
        if self.concurrency > self.handler_concurrency:
            notes.append(
                f"PGREACT_CONCURRENCY={self.concurrency} is capped at {self.handler_concurrency}"
                f" (PGREACT_POOL_SIZE {self.pool_size} - 1: one pooled connection stays free for"
                f" housekeeping): raise PGREACT_POOL_SIZE to {self.concurrency + 1}, or lower"
                " PGREACT_CONCURRENCY"
            )
        return notes

    def require_database_url(self) -> str:
        """The write engine's SQLAlchemy URL: its driver named, its password resolved."""
        url = self._with_password(self._given_database_url())
        if not _URL_DRIVER.match(url):
            url = re.sub(
                r"^postgres(?:ql)?://", f"postgresql+{self.write_driver}://", url, flags=re.I
            )
        return url

    def _given_database_url(self) -> str:
        if not self.database_url:
            raise ConfigError(f"PGREACT_DATABASE_URL is not set: {_HINTS['database_url']}")
        return self.database_url

    def _with_password(self, url: str) -> str:
        password = self._passwords.get(url)
        return url if password is None else _insert_password(url, password)

    def require_handlers(self) -> list[str]:
        modules = self.handler_modules
        if not modules:
            raise ConfigError(f"PGREACT_HANDLERS is not set: {_HINTS['handlers']}")
        return modules


def _insert_password(url: str, password: str) -> str:
    """``url`` with ``password`` percent-encoded into its userinfo, the rest kept verbatim
    (SQLAlchemy's rendering would leave a space unencoded, which libpq refuses)."""
    scheme, _, rest = url.partition("://")
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, hosts = authority.rpartition("@")
    user = userinfo.split(":", 1)[0] if at else ""
    return f"{scheme}://{user}:{quote(password, safe='')}@{hosts}{tail}"


def _pool_capacity(pool_size: object) -> int:
    return max(1, pool_size - 1) if isinstance(pool_size, int) else 1


def _driver_of(url: str) -> Driver:
    match = _URL_DRIVER.match(url)
    if match is None:  # validated before; kept for the type checker
        raise ConfigError(f"cannot tell the driver of {mask_url(url)}")
    return "asyncpg" if match.group(1).lower() == "asyncpg" else "psycopg"


def libpq_url(url: str) -> str:
    """``postgresql+asyncpg://…`` → ``postgresql://…`` (both drivers accept the libpq form)."""
    return libpq_dsn(url)


def mask_url(url: str) -> str:
    """Hide every password in a URL, DSN or message quoting one (see
    :func:`pgreact.listeners.dsn.mask_dsn`, the one masking function)."""
    return mask_dsn(url)


@dataclass(frozen=True, slots=True)
class _Where:
    config_file: Path | None = None
    environ: Mapping[str, str] | None = None


_SOURCES: ContextVar[_Where | None] = ContextVar("pgreact_settings_sources", default=None)


@contextmanager
def _sources(where: _Where) -> Iterator[None]:
    token = _SOURCES.set(where)
    try:
        yield
    finally:
        _SOURCES.reset(token)


class _EnvSource(EnvSettingsSource):
    """The environment source, reading a given mapping (``os.environ`` when None)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str] | None):
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        if self._environ is None:
            return super()._load_env_vars()
        return parse_env_vars(
            self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


class _TomlSource(TomlConfigSettingsSource):
    """``--config FILE``: keys as setting names or variable names; unknown keys are errors."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        self._path = path
        super().__init__(settings_cls, toml_file=path)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        path = self._path
        try:
            data = tomllib.loads(Path(file_path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"--config: file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"--config: cannot read {str(path)!r}: {exc}") from None
        out: dict[str, Any] = {}
        for key, value in data.items():
            name = key.lower().removeprefix(ENV_PREFIX.lower())
            name = "schema_name" if name == "schema" else name
            if name not in Settings.model_fields:
                raise ConfigError(
                    f"--config {path}: unknown setting {key!r}{_did_you_mean(name, lower=True)};"
                    " see the configuration table in the README for valid names"
                )
            out[name] = value
        return out


def variable_names() -> list[str]:
    """Every ``PGREACT_*`` variable pgreact reads."""
    return [
        "PGREACT_SCHEMA" if name == "schema_name" else ENV_PREFIX + name.upper()
        for name in Settings.model_fields
    ]


def _did_you_mean(name: str, *, lower: bool = False) -> str:
    names = variable_names()
    if lower:
        names = [n.removeprefix(ENV_PREFIX).lower() for n in names]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each ``PGREACT_*`` variable that is no setting (a typo is otherwise
    silently ignored), naming the closest valid one."""
    known = set(variable_names())
    return [
        f"{name} is not a pgreact setting and is ignored{_did_you_mean(name)}"
        for name in sorted(environ)
        if name.upper().startswith(ENV_PREFIX)
        and name.upper() not in known
        and not _NOT_SETTINGS.match(name.upper())
    ]


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Read settings from the environment (``os.environ`` unless ``environ`` is given), then
    the TOML file, then ``overrides`` (highest priority)."""
    env = os.environ if environ is None else environ
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"--config: file {str(config_file)!r} does not exist")
    try:
        with _sources(_Where(config_file, environ)):
            settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None
    settings._unknown = unknown_variables(env)
    notes: list[str] = []
    for url in (settings.database_url, settings.listen_url):
        if url:
            password = _password_for(url, env, notes)
            if password is not None:
                settings._passwords[url] = password
    settings._credential_notes = list(dict.fromkeys(notes))  # both URLs may read one file
    return settings


# -- credentials the libpq way ----------------------------------------------------------------


def _password_for(url: str, env: Mapping[str, str], notes: list[str]) -> str | None:
    """The password to add to ``url``: None when it has one (or none is configured);
    otherwise ``PGPASSWORD``, else the first matching line of the password file. Why a password
    file was passed over goes to ``notes``."""
    parsed = make_url(url)
    if parsed.password is not None:
        return None
    if env.get("PGPASSWORD"):
        return env["PGPASSWORD"]
    return _from_passfile(parsed, env, notes)


def _from_passfile(url: URL, env: Mapping[str, str], notes: list[str]) -> str | None:
    """libpq's password file: ``hostname:port:database:username:password`` lines, ``*``
    matching anything, backslash escaping ``:`` and itself. Like libpq, ignored when it is not a
    plain file or (on POSIX) accessible by group or others; and, as libpq warns then, so does
    pgreact (``notes``): silence left an operator with an authentication failure to puzzle over."""
    given = env.get("PGPASSFILE")
    path = Path(given) if given else Path(env.get("HOME", str(Path.home()))) / ".pgpass"
    source = "PGPASSFILE" if given else "the default: PGPASSFILE is not set"
    where = f"password file {str(path)!r} ({source})"
    try:
        if not path.exists():
            if given:  # the default may well be absent; a file named on purpose should not be
                notes.append(f"{where} does not exist: no password is read from it")
            return None
        if not path.is_file():
            notes.append(f"{where} is not a plain file: ignored, as libpq ignores it")
            return None
        mode = stat.S_IMODE(path.stat().st_mode)
        if os.name == "posix" and mode & 0o077:
            notes.append(_passfile_mode_note(where, mode))
            return None
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        notes.append(f"{where} cannot be read ({exc.strerror or exc}): no password is read from it")
        return None
    query = url.query
    host = url.host or _first(query.get("host")) or env.get("PGHOST") or "localhost"
    if host.startswith("/"):
        host = "localhost"  # libpq matches a Unix socket's entries under localhost
    port = str(url.port or _first(query.get("port")) or env.get("PGPORT") or 5432)
    user = url.username or env.get("PGUSER") or ""
    database = url.database or env.get("PGDATABASE") or user
    wanted = (host, port, database, user)
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = _passfile_fields(line)
        if len(fields) == 5 and all(f in ("*", w) for f, w in zip(fields[:4], wanted, strict=True)):
            return fields[4]
    return None


def _passfile_mode_note(where: str, mode: int) -> str:
    return (
        f"{where} is ignored: its mode is {mode:04o}, and like libpq pgreact reads only a file"
        " that group and others cannot access (0600 or less): chmod 600 it; from a Kubernetes"
        " Secret volume (0644 by default) set defaultMode: 0600 (384 in JSON). A pod fsGroup"
        " (pgreact's manifests set one) adds group read whatever defaultMode says: then set"
        " PGPASSWORD from the Secret (secretKeyRef) instead"
    )


def _first(value: str | tuple[str, ...] | None) -> str | None:
    if isinstance(value, tuple):
        return value[0] if value else None
    return value


def _passfile_fields(line: str) -> list[str]:
    fields: list[str] = []
    current: list[str] = []
    chars = iter(line)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":" and len(fields) < 4:
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if isinstance(p, str)]
        field = loc[0] if loc else ""
        field = "schema_name" if field == "PGREACT_SCHEMA" else field
        var = "PGREACT_SCHEMA" if field == "schema_name" else ENV_PREFIX + field.upper()
        msg = str(err["msg"]).removeprefix("Value error, ")
        if not field:
            lines.append(msg)
            continue
        given = err.get("input")
        shown = "" if given is None or "url" in field else f" (got {given!r})"
        hint = _HINTS.get(field, "see the configuration table in the README")
        if err["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown setting; {hint}")
        else:
            lines.append(f"{var}: {msg}{shown}; {hint}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
