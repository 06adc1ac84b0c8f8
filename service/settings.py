"""One frozen settings object, read from ``PGREACT_*`` variables and optionally a TOML file.

A TOML file (``--config FILE``) overrides the environment. Its keys are the setting names in
lower case without the prefix (``pool_size = 20``) or the variable names (``PGREACT_POOL_SIZE``).
Every error names the variable and the fix; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from pgreact.errors import ConfigError

ENV_PREFIX = "PGREACT_"
Driver = Literal["asyncpg", "psycopg"]
_URL_DRIVER = re.compile(r"^postgres(?:ql)?\+(asyncpg|psycopg)://", re.IGNORECASE)
_PLAIN_URL = re.compile(r"^postgres(?:ql)?://", re.IGNORECASE)
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

_HINTS: dict[str, str] = {
    "database_url": "set it to a SQLAlchemy async URL such as "
    "postgresql+asyncpg://user:pass@host:5432/db or postgresql+psycopg://…",
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

    pool_size: int = Field(default=10, ge=1)
    max_overflow: int = Field(default=5, ge=0)
    pool_timeout: float = Field(default=30.0, gt=0)
    pool_recycle: int = Field(default=1800, ge=-1)
    pool_pre_ping: bool = True
    pooler: Literal["none", "pgbouncer-transaction"] = "none"

    concurrency: int = Field(default=16, ge=1, le=1024)
    batch_size: int = Field(default=100, ge=1, le=10_000)
    max_attempts: int = Field(default=10, ge=1)
    retry_base: float = Field(default=1.0, gt=0)
    retry_max: float = Field(default=300.0, gt=0)
    handler_timeout: float = Field(default=30.0, gt=0)
    sweep_interval: float = Field(default=5.0, gt=0)

    http_host: str = "0.0.0.0"  # noqa: S104 - a pod must be scrapable on its pod IP
    http_port: int = Field(default=9000, ge=0, le=65535)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    shutdown_timeout: float = Field(default=25.0, ge=0)
    replicas: int = Field(default=1, ge=1)

    # Beyond the contract: documented in the README's configuration table.
    heartbeat_interval: float = Field(default=5.0, gt=0)
    heartbeat_timeout: float = Field(default=5.0, gt=0)
    connect_timeout: float = Field(default=10.0, gt=0)
    stats_interval: float = Field(default=5.0, gt=0)
    command_timeout: float | None = Field(default=None, gt=0)  # asyncpg; handler timeout + 2
    tcp_keepalives_idle: int = Field(default=60, ge=0)  # 0 turns keepalives off
    application_name: str = "pgreact"

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
        if self.database_url and not _URL_DRIVER.match(self.database_url):
            raise ValueError(
                "PGREACT_DATABASE_URL must name its async driver: write postgresql+asyncpg://… "
                "or postgresql+psycopg://… instead of postgresql://…"
            )
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
        return _driver_of(self.require_database_url())

    @property
    def effective_listen_url(self) -> str:
        return self.listen_url or self.require_database_url()

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

    def require_database_url(self) -> str:
        if not self.database_url:
            raise ConfigError(f"PGREACT_DATABASE_URL is not set: {_HINTS['database_url']}")
        return self.database_url

    def require_handlers(self) -> list[str]:
        modules = self.handler_modules
        if not modules:
            raise ConfigError(f"PGREACT_HANDLERS is not set: {_HINTS['handlers']}")
        return modules


def _driver_of(url: str) -> Driver:
    match = _URL_DRIVER.match(url)
    if match is None:  # validated before; kept for the type checker
        raise ConfigError(f"cannot tell the driver of {mask_url(url)}")
    return "asyncpg" if match.group(1).lower() == "asyncpg" else "psycopg"


def libpq_url(url: str) -> str:
    """``postgresql+asyncpg://…`` → ``postgresql://…`` (both drivers accept the libpq form)."""
    return re.sub(r"^postgres(?:ql)?\+\w+://", "postgresql://", url, flags=re.IGNORECASE)


def mask_url(url: str) -> str:
    """Hide the password in a URL for logs, errors and status output (``user:pass@`` as well
    as a ``password=`` query parameter or keyword)."""
    masked = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
    return re.sub(r"(?i)(\bpassword=)[^&\s]*", r"\1***", masked)


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Read settings from the environment, then the TOML file, then ``overrides``."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(_read_toml(config_file))
    values.update(overrides)
    saved = dict(os.environ)
    try:
        if environ is not None:  # pydantic-settings reads os.environ: swap it in for the call
            os.environ.clear()
            os.environ.update(env)
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None
    finally:
        if environ is not None:
            os.environ.clear()
            os.environ.update(saved)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config: file {str(path)!r} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config: cannot read {str(path)!r}: {exc}") from None
    fields = Settings.model_fields
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.lower().removeprefix(ENV_PREFIX.lower())
        if name == "schema":
            name = "schema_name"
        if name not in fields:
            raise ConfigError(
                f"--config {path}: unknown setting {key!r}; see the configuration table in the "
                "README for valid names"
            )
        out[name] = value
    return out


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
