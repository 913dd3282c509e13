"""The lean request-reply path (`bus.connection.request`, used by `call`, the event store and the
edge) against a real nats-server: replies reach their own caller, and failures map as before."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.msg import Msg

from bus.client import call
from bus.connection import request
from bus.errors import DeadlineError, UnavailableError
from infra.bootstrap import nats_connection
from tests.conftest import System

# One stream's mechanics: they need no second run over partitions.
pytestmark = pytest.mark.single_stream


async def test_concurrent_requests_each_get_their_own_reply(system: System) -> None:
    subject = f"{system.settings.namespace}.echo"

    async def echo(msg: object) -> None:
        await msg.respond(b"re:" + msg.data)  # type: ignore[attr-defined]

    sub = await system.nc.subscribe(subject, cb=echo)
    # A connection of its own: the system's roles make JetStream API calls on theirs meanwhile.
    async with nats_connection(system.settings, "request-test") as nc:
        try:
            replies = await asyncio.gather(*(request(nc, subject, b"%d" % i, timeout=5) for i in range(200)))
            assert [r.data for r in replies] == [b"re:%d" % i for i in range(200)]
            assert not nc._resp_map  # noqa: SLF001 - nothing left behind per call
        finally:
            await sub.unsubscribe()


async def test_a_subject_nobody_serves_is_unavailable_at_once(system: System) -> None:
    with pytest.raises(UnavailableError):
        await call(system.nc, f"{system.settings.namespace}.nobody", b"{}", timeout=5)


async def test_a_service_that_never_answers_is_a_deadline_and_leaves_nothing_behind(system: System) -> None:
    subject = f"{system.settings.namespace}.silent"

    async def swallow(_msg: object) -> None:
        return None

    sub = await system.nc.subscribe(subject, cb=swallow)
    async with nats_connection(system.settings, "request-test") as nc:  # its own, as above
        try:
            with pytest.raises(DeadlineError):
                await call(nc, subject, b"{}", timeout=0.2)
            assert not nc._resp_map  # noqa: SLF001
        finally:
            await sub.unsubscribe()


async def test_headers_arrive_as_sent_through_the_faster_parser(system: System) -> None:
    subject = f"{system.settings.namespace}.headers"
    sent = {"Trace-Id": "4bf92f3577b34da6", "Jetsource-Time": "2026-11-27T11:57:03+00:00", "Empty": "",
            "Spaced": "a value with spaces", "Unicode": "grüße"}

    async def echo_headers(msg: Msg) -> None:
        await msg.respond(b"")  # a reply carries the request's headers back

    sub = await system.nc.subscribe(subject, cb=echo_headers)
    try:
        reply = await request(system.nc, subject, b"", timeout=5, headers=sent)
        assert reply.headers == sent
    finally:
        await sub.unsubscribe()
