"""Which database failures are an outage (retry, answer 503) and which are one event's data (park)."""

from __future__ import annotations

import asyncpg
import pytest

from projections.schema import database_down


@pytest.mark.parametrize("exc", [
    ConnectionRefusedError(111, "refused"),
    TimeoutError(),
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
    asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
    asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.exceptions.TooManyConnectionsError("too many clients"),
    asyncpg.exceptions.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
    asyncpg.exceptions.UndefinedColumnError("column does not exist"),  # a missed migration: not the events'
    asyncpg.exceptions.InsufficientPrivilegeError("permission denied"),
    asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
    asyncpg.exceptions.InternalClientError("cannot switch to state 12"),
])
def test_outages_are_retried(exc: BaseException) -> None:
    assert database_down(exc)


@pytest.mark.parametrize("exc", [
    asyncpg.exceptions.UniqueViolationError("duplicate key"),
    asyncpg.exceptions.NumericValueOutOfRangeError("out of range"),
    asyncpg.exceptions.InvalidTextRepresentationError("invalid input syntax"),
    asyncpg.exceptions._base.DataError("invalid input for query argument $1: value out of int32 range"),  # noqa: SLF001
    OverflowError("date value out of range"),
    KeyError("lines"),
])
def test_bad_data_is_not_an_outage(exc: BaseException) -> None:
    assert not database_down(exc)
