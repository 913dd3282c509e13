"""Read-model DDL, applied idempotently, in the schema the settings name."""

from __future__ import annotations

import asyncpg

DDL = """
CREATE TABLE IF NOT EXISTS projection_checkpoints (
    name        text PRIMARY KEY,
    last_seq    bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS orders (
    order_id    text PRIMARY KEY,
    customer_id text NOT NULL,
    status      text NOT NULL,
    currency    text NOT NULL,
    total       bigint NOT NULL,
    version     bigint NOT NULL,
    placed_at   timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    failure     text
);
ALTER TABLE orders ADD COLUMN IF NOT EXISTS tracking text;
CREATE INDEX IF NOT EXISTS orders_by_time ON orders (placed_at DESC, order_id DESC);
CREATE INDEX IF NOT EXISTS orders_by_status ON orders (status, placed_at DESC, order_id DESC);
CREATE INDEX IF NOT EXISTS orders_by_customer ON orders (customer_id, placed_at DESC, order_id DESC);
CREATE TABLE IF NOT EXISTS tasks (
    task_id          text PRIMARY KEY,
    type             text NOT NULL,
    status           text NOT NULL,
    priority         text NOT NULL,
    payload          jsonb,
    attempt          integer NOT NULL,
    max_attempts     integer NOT NULL,
    run_at           timestamptz NOT NULL,
    timeout_s        double precision NOT NULL,
    progress         double precision,
    progress_message text,
    result           jsonb,
    error            text,
    worker           text,
    ref              text,
    submitted_at     timestamptz NOT NULL,
    started_at       timestamptz,
    finished_at      timestamptz,
    version          bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_time ON tasks (submitted_at DESC, task_id DESC);
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status, submitted_at DESC, task_id DESC);
CREATE TABLE IF NOT EXISTS order_lines (
    order_id    text NOT NULL REFERENCES orders (order_id) ON DELETE CASCADE,
    sku         text NOT NULL,
    quantity    integer NOT NULL,
    unit_price  bigint NOT NULL,
    PRIMARY KEY (order_id, sku)
);
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


async def ensure_schema(dsn: str, schema: str) -> None:
    """Create the schema and tables if missing (safe to run on every start)."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            # Serialise concurrent starters (several processes may race here).
            await conn.execute("SELECT pg_advisory_xact_lock(7411)")
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
            await conn.execute(f"SET LOCAL search_path TO {quote_ident(schema)}")
            await conn.execute(DDL)
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
