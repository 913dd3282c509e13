"""Read-model DDL, applied idempotently, in the schema the settings name."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

CHECKPOINTS_DDL = """
CREATE TABLE IF NOT EXISTS projection_checkpoints (
    name        text PRIMARY KEY,
    last_seq    bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- A blue/green rebuild holds a read model at a sequence: its projector applies up to it, then
-- waits — while the rebuild holds the advisory lock `hold_by` (a rebuild that died lets go).
ALTER TABLE projection_checkpoints ADD COLUMN IF NOT EXISTS hold_at bigint;
ALTER TABLE projection_checkpoints ADD COLUMN IF NOT EXISTS hold_by bigint;
"""


# SQLSTATE classes that say something is wrong with the database or the code reading it, not
# with one event: connection (08), invalid transaction state such as read-only after a failover
# (25), authorization (28), missing catalog or schema (3D, 3F), transaction rollback: deadlock,
# serialization (40), syntax, undefined table or column, privilege (42), resources (53), object
# state (55), operator intervention: shutdown, cannot connect now (57), system and internal
# errors (58, XX). Data exceptions (22), constraint violations (23) and the like are the data's.
_SYSTEMIC_SQLSTATE_CLASSES = frozenset({"08", "25", "28", "3D", "3F", "40", "42", "53", "55", "57", "58", "XX"})
_CLIENT_DATA_ERROR = asyncpg.exceptions._base.DataError  # noqa: SLF001 - an argument that cannot be encoded


def database_down(exc: BaseException) -> bool:
    """Whether exc says the database is away, overloaded or not fit to use (retry it, answer
    `unavailable`), rather than that one event's data cannot be stored (park it)."""
    if isinstance(exc, _CLIENT_DATA_ERROR):  # an InterfaceError too, but about a value: the data's fault
        return False
    if isinstance(exc, asyncpg.exceptions.InvalidCachedStatementError):
        return True  # the tables changed under a prepared statement (a rebuild's swap): retry afresh
    if isinstance(exc, OSError | TimeoutError | asyncpg.PostgresConnectionError | asyncpg.InterfaceError
                  # A connection whose server died under it can refuse the next operation before
                  # asyncpg has seen the socket close ("cannot switch to state 12 ...").
                  | asyncpg.exceptions.InternalClientError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return str(getattr(exc, "sqlstate", "") or "")[:2] in _SYSTEMIC_SQLSTATE_CLASSES
    return False


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def ensure_schema(dsn: str, schema: str, ddls: Sequence[str]) -> None:
    """Create the schema, the checkpoints table and each read model's tables (`ddls`, each
    idempotent) if missing: safe to run on every start."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            # Serialise concurrent starters (several processes may race here).
            await conn.execute("SELECT pg_advisory_xact_lock(7411)")
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
            await conn.execute(f"SET LOCAL search_path TO {quote_ident(schema)}")
            await conn.execute(CHECKPOINTS_DDL)
            for ddl in ddls:
                await conn.execute(ddl)
    finally:
        await conn.close()


async def create_pool(dsn: str, schema: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool whose connections resolve tables in the read-model schema.

    Read models are derived data whose checkpoint commits in the same transaction, so
    `synchronous_commit = off` is safe: a crash can only lose the newest transactions whole,
    checkpoint included, and the projector re-applies them from the stream. It keeps the
    projector's WAL flushes from competing with JetStream's fsyncs for the disk.
    """
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size,
        server_settings={"search_path": schema, "synchronous_commit": "off"},
    )
    assert pool is not None
    return pool
