"""Small, careful helpers for SQL text: identifier/literal quoting and script splitting.

Everything ``install`` puts into SQL passes through :func:`quote_ident` or
:func:`quote_literal`, so a table named ``"Order; drop table x"`` is just a table name.
"""

from __future__ import annotations

from importlib import resources

SCHEMA_TOKEN = "__SCHEMA__"  # noqa: S105 - a placeholder, not a secret
CHANNEL_TOKEN = "__CHANNEL__"  # noqa: S105


def quote_ident(name: str) -> str:
    """Quote an identifier the way PostgreSQL's ``quote_ident`` does, always."""
    if "\x00" in name:
        raise ValueError("identifiers cannot contain NUL")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote a string literal (standard_conforming_strings is on since PostgreSQL 9.1)."""
    if "\x00" in value:
        raise ValueError("string literals cannot contain NUL")
    return "'" + value.replace("'", "''") + "'"


def qualified(schema: str, name: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(name)}"


def split_statements(script: str) -> list[str]:
    """Split a script on top-level semicolons, respecting quotes, dollar quotes and comments."""
    statements: list[str] = []
    buf: list[str] = []
    i, n = 0, len(script)
    while i < n:
        ch = script[i]
        if ch == "-" and script.startswith("--", i):
            end = script.find("\n", i)
            end = n if end < 0 else end
            buf.append(script[i:end])
            i = end
            continue
        if ch == "/" and script.startswith("/*", i):
            end = script.find("*/", i + 2)
            end = n if end < 0 else end + 2
            buf.append(script[i:end])
            i = end
            continue
        if ch in ("'", '"'):
            end = i + 1
            while end < n:
                if script[end] == ch:
                    if end + 1 < n and script[end + 1] == ch:
                        end += 2
                        continue
                    break
                end += 1
            buf.append(script[i : end + 1])
            i = end + 1
            continue
        if ch == "$":
            close = script.find("$", i + 1)
            tag = script[i : close + 1] if close > 0 else ""
            if tag and (tag == "$$" or tag[1:-1].replace("_", "a").isalnum()):
                end = script.find(tag, close + 1)
                end = n if end < 0 else end + len(tag)
                buf.append(script[i:end])
                i = end
                continue
        if ch == ";":
            _flush(buf, statements)
            buf = []
            i += 1
            continue
        buf.append(ch)
        i += 1
    _flush(buf, statements)
    return statements


def _flush(buf: list[str], statements: list[str]) -> None:
    text = "".join(buf).strip()
    meaningful = "\n".join(
        line for line in text.splitlines() if line.strip() and not line.strip().startswith("--")
    )
    if meaningful:
        statements.append(text)


def migration_files() -> list[tuple[int, str]]:
    """The shipped migrations as ``(version, raw text)``, in order."""
    found: list[tuple[int, str]] = []
    for entry in resources.files("pgreact.schema").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), entry.read_text(encoding="utf-8")))
    return sorted(found)


def render(raw: str, schema: str, channel: str) -> str:
    return raw.replace(SCHEMA_TOKEN, quote_ident(schema)).replace(
        CHANNEL_TOKEN, quote_literal(channel)
    )
