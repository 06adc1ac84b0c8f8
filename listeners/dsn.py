"""DSN helpers shared by the listener backends: driver-suffix stripping and password masking."""

from __future__ import annotations

import re

_SCHEME_SUFFIX = re.compile(r"^(postgres(?:ql)?)\+[a-z0-9_]+://", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^:/@?#]*):[^@/?#]*@", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)

MASK = "***"


def libpq_dsn(dsn: str) -> str:
    """Return ``dsn`` as a plain libpq URL: ``postgresql+asyncpg://…`` becomes ``postgresql://…``.

    SQLAlchemy URLs name the driver after a ``+``; libpq, asyncpg and psycopg do not accept it.
    Anything else (keyword/value strings, URLs without a suffix) is returned unchanged.
    """
    return _SCHEME_SUFFIX.sub(r"\1://", dsn, count=1)


def mask_dsn(dsn: str) -> str:
    """Hide the password of a URL or keyword/value DSN so it can be logged.

    >>> mask_dsn("postgresql://app:s3cret@db:5432/app?sslmode=require")
    'postgresql://app:***@db:5432/app?sslmode=require'
    >>> mask_dsn("host=db user=app password='a b' dbname=app")
    'host=db user=app password=*** dbname=app'
    """
    masked = _URL_PASSWORD.sub(rf"\1:{MASK}@", dsn, count=1)
    masked = _QUERY_PASSWORD.sub(rf"\g<1>{MASK}", masked)
    if "://" not in masked:
        masked = _KEYWORD_PASSWORD.sub(rf"\g<1>{MASK}", masked)
    return masked
