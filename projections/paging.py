"""Keyset pagination shared by the list queries: newest first by (time, id), opaque cursors."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg

from bus.errors import ValidationError


def _encode(at: datetime, key: str) -> str:
    return base64.urlsafe_b64encode(f"{at.astimezone(UTC).isoformat()}|{key}".encode()).decode()


def _decode(cursor: str) -> tuple[datetime, str]:
    try:
        at, key = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(at), key
    except (ValueError, UnicodeDecodeError):
        raise ValidationError("cursor is not one this service issued", field="cursor") from None


async def keyset_page(
    conn: asyncpg.Connection | asyncpg.Pool,
    select: str,
    filters: Sequence[tuple[str, object]],
    *,
    time_column: str,
    id_column: str,
    cursor: str | None,
    limit: int,
) -> tuple[list[asyncpg.Record], str | None]:
    """One page of `select` (a query without WHERE), filtered by column equality where the value
    is not None, newest first; returns the rows and the cursor of the next page (None at the end)."""
    where, args = [], []
    for column, value in filters:
        if value is not None:
            args.append(value)
            where.append(f"{column} = ${len(args)}")
    if cursor is not None:
        args += _decode(cursor)
        where.append(f"({time_column}, {id_column}) < (${len(args) - 1}, ${len(args)})")
    args.append(limit + 1)
    sql = (select + (" WHERE " + " AND ".join(where) if where else "")
           + f" ORDER BY {time_column} DESC, {id_column} DESC LIMIT ${len(args)}")
    rows = await conn.fetch(sql, *args)
    if len(rows) <= limit:
        return list(rows), None
    rows = rows[:limit]
    return list(rows), _encode(rows[-1][time_column], rows[-1][id_column])
