"""DSN helpers shared by pgreact: driver-suffix stripping and the one password-masking function.

:func:`mask_dsn` is what every log line, error message and status output goes through. Neither
library offers a masking function that fits: SQLAlchemy's ``render_as_string(hide_password=True)``
keeps the tail of a password with an unescaped ``@`` (``u:p@ss@h`` shows ``ss@h``), reorders
the query and refuses multi-host URLs; psycopg's conninfo rewrites a URL as keywords. So the
text is masked by a scan (URL userinfo) and by pattern (``?password=``, ``password=`` keywords,
quoted or not), in time linear in its length, and libpq's own parser (``psycopg.conninfo``)
is the check: when the whole text is a DSN and libpq still reads a password other than the
mask from the result, the DSN is rebuilt from libpq's parse instead.
"""

from __future__ import annotations

import bisect
import re

import psycopg

_SCHEME_SUFFIX = re.compile(r"^(postgres(?:ql)?)\+[a-z0-9_]+://", re.IGNORECASE)
# Where a URL's userinfo may start: just after "scheme://". The look-behind makes a scan of a long
# word linear (without it, each of its letters started a scheme that ran to its end).
_URL_START = re.compile(r"(?<![a-z0-9+.-])[a-z][a-z0-9+.-]*://", re.IGNORECASE)
# a query value ends at '&' or '#' only: a raw space is part of it (SQLAlchemy keeps it)
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#\n]*", re.IGNORECASE)
# keyword form: a single-quoted value may hold spaces, \' and \\ (libpq's quoting rules)
_KEYWORD_PASSWORD = re.compile(
    r"(?<![?&\w])(password\s*=\s*)('(?:[^'\\]|\\.)*'?|\S+)", re.IGNORECASE
)

MASK = "***"


def libpq_dsn(dsn: str) -> str:
    """Return ``dsn`` as a plain libpq URL: ``postgresql+asyncpg://…`` becomes ``postgresql://…``.

    SQLAlchemy URLs name the driver after a ``+``; libpq, asyncpg and psycopg do not accept it.
    Anything else (keyword/value strings, URLs without a suffix) is returned unchanged.
    """
    return _SCHEME_SUFFIX.sub(r"\1://", dsn, count=1)


def mask_dsn(text: str) -> str:
    """Hide every password in ``text``: a URL or keyword/value DSN, or a message quoting one.

    >>> mask_dsn("postgresql://app:s3cret@db:5432/app?sslmode=require")
    'postgresql://app:***@db:5432/app?sslmode=require'
    >>> mask_dsn("host=db user=app password='a b' dbname=app")
    'host=db user=app password=*** dbname=app'
    """
    masked = _mask_userinfo(text)
    masked = _QUERY_PASSWORD.sub(rf"\g<1>{MASK}", masked)
    masked = _KEYWORD_PASSWORD.sub(rf"\g<1>{MASK}", masked)
    params = _libpq_params(text)
    if params is not None and params.get("password") not in (None, "", MASK):
        left = _libpq_params(masked)
        if left is None or left.get("password") not in (None, "", MASK):
            # The patterns missed it (a form they do not know): show libpq's reading instead.
            return psycopg.conninfo.make_conninfo("", **{**params, "password": MASK})
    return masked


def _mask_userinfo(text: str) -> str:
    """Mask the password of every URL's userinfo ("user:password@") in ``text``.

    The user runs to the first ':' (SQLAlchemy's reading; it may hold '@', as Azure's
    "user@server" does), the password from there to the *last* '@' on its line before the next
    URL that follows whitespace. So a password may hold whatever SQLAlchemy accepts unescaped:
    spaces, quotes, '/', '?', several '@' (libpq ends it at the first, so a tail would otherwise
    show). The cost is masking too much, never too little: after a URL without a password, text
    up to a later '@' on the same line is masked too.
    """
    urls = [(m.start(), m.end()) for m in _URL_START.finditer(text)]
    if not urls:
        return text
    newlines = [i for i, c in enumerate(text) if c == "\n"]
    ats = [i for i, c in enumerate(text) if c == "@"]
    # Where each URL's password must end: its line's end, or the next URL after whitespace.
    bounds: list[int] = []
    after = len(text)
    for start, _ in reversed(urls):
        bounds.append(after)
        if start > 0 and text[start - 1].isspace():
            after = start
    bounds.reverse()
    parts: list[str] = []
    emitted = 0  # text[:emitted] is in ``parts``
    for (_, begin), next_url in zip(urls, bounds, strict=True):
        if begin < emitted:
            continue  # inside a password masked already
        line = bisect.bisect_left(newlines, begin)
        bound = min(next_url, newlines[line]) if line < len(newlines) else next_url
        last = bisect.bisect_left(ats, bound) - 1  # the last '@' before ``bound``
        at = ats[last] if last >= 0 else -1
        colon = text.find(":", begin, at) if at > begin else -1
        if colon < 0 or "/" in text[begin:colon]:
            continue  # no userinfo, one without a password, or the ':' is a port's
        parts += [text[emitted : colon + 1], MASK]
        emitted = at
    return "".join(parts) + text[emitted:]


def _libpq_params(text: str) -> dict[str, str | int | None] | None:
    """The parameters libpq reads from ``text`` if the whole text is a DSN, else None."""
    if "=" not in text and "@" not in text:
        return None
    try:
        return dict(psycopg.conninfo.conninfo_to_dict(libpq_dsn(text.strip())))
    except (psycopg.Error, ValueError):
        return None
