"""``copy_rows``: bulk writes for ``on_batch`` handlers with PostgreSQL's COPY.

COPY runs on the session's own connection, inside the transaction pgreact opened, so the rows
commit or roll back together with the batch's ack — exactly like the handler's other writes.
Each driver exposes COPY its own way; this hides the difference.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from pgreact.db import note_statement_sent
from pgreact.router import TableName
from pgreact.sql import qualified, quote_ident


async def copy_rows(
    session: AsyncSession,
    table: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
) -> int:
    """COPY ``rows`` into ``table`` (``"schema.table"``) through ``session``'s transaction.

    Returns the number of rows written. Works with both drivers, and behind PgBouncer in
    transaction mode (COPY needs no prepared statement).
    """
    name = TableName.parse(table)
    records = [tuple(r) for r in rows]
    if not records:
        return 0
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    driver: Any = raw.driver_connection
    note_statement_sent(connection)  # a handler failing after this has written something
    if type(driver).__module__.startswith("asyncpg"):
        if not driver.is_in_transaction():
            # SQLAlchemy's asyncpg adapter sends BEGIN lazily, with the first statement; a COPY
            # issued before it would run outside the transaction and survive a rollback.
            await connection.exec_driver_sql("SELECT 1")
        await driver.copy_records_to_table(
            name.name, schema_name=name.schema, columns=list(columns), records=records
        )
        return len(records)
    cols = ", ".join(quote_ident(c) for c in columns)
    statement = f"COPY {qualified(name.schema, name.name)} ({cols}) FROM STDIN"
    async with driver.cursor() as cursor, cursor.copy(statement) as copy:
        for record in records:
            await copy.write_row(record)
    return len(records)
