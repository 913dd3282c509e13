"""Batch pulls (`bus.pull.Puller`, under the projector and the workers) against a real
nats-server: order, batch bounds, waiting for the first message, and nothing skipped."""

from __future__ import annotations

import pytest

import asyncio

from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from bus.pull import Puller
from tests.conftest import System

# One stream's mechanics: they need no second run over partitions.
pytestmark = pytest.mark.single_stream


async def _stream(system: System, ack_policy: AckPolicy = AckPolicy.EXPLICIT) -> tuple[str, str, str]:
    ns = system.settings.namespace
    stream, subject, durable = f"PULL_{ns}", f"{ns}.pull.items", "reader"
    js = system.nc.jetstream()
    await js.add_stream(StreamConfig(name=stream, subjects=[subject], storage=StorageType.MEMORY))
    await js.add_consumer(stream, ConsumerConfig(durable_name=durable, ack_policy=ack_policy, ack_wait=30))
    return stream, subject, durable


async def test_pulls_return_messages_in_order_and_never_more_than_asked(system: System) -> None:
    stream, subject, durable = await _stream(system)
    js = system.nc.jetstream()
    for i in range(25):
        await js.publish(subject, b"%d" % i)
    puller = Puller(system.nc, stream, durable)
    try:
        got = [m.data for m in await puller.pull(10)]
        got += [m.data for m in await puller.pull(10)]
        got += [m.data for m in await puller.pull(10)]
        assert got == [b"%d" % i for i in range(25)]
        assert await puller.pull(10) == []
    finally:
        await puller.close()


async def test_an_idle_pull_waits_for_the_first_message_and_an_eager_one_does_not(system: System) -> None:
    stream, subject, durable = await _stream(system)
    js = system.nc.jetstream()
    puller = Puller(system.nc, stream, durable)
    try:
        assert await puller.pull(5) == []  # nothing there, no wait asked: back at once

        async def later() -> None:
            await asyncio.sleep(0.3)
            await js.publish(subject, b"late")

        publisher = asyncio.get_running_loop().create_task(later())
        got = await puller.pull(5, wait_s=5.0)
        await publisher
        assert [m.data for m in got] == [b"late"]
        assert await puller.pull(5, wait_s=0.2) == []  # expired quietly
    finally:
        await puller.close()


async def test_a_cumulative_ack_of_the_last_pulled_message_leaves_nothing_pending(system: System) -> None:
    stream, subject, durable = await _stream(system, AckPolicy.ALL)
    js = system.nc.jetstream()
    for i in range(300):
        await js.publish(subject, b"%d" % i)
    puller = Puller(system.nc, stream, durable)
    try:
        seen: list[int] = []
        while len(seen) < 300:
            msgs = await puller.pull(128, wait_s=1.0)
            assert msgs, "a message went missing"
            seen += [int(m.data) for m in msgs]
            await msgs[-1].ack()
        assert seen == list(range(300))
        await asyncio.sleep(0.1)
        info = await js.consumer_info(stream, durable)
        assert info.num_pending == 0 and info.num_ack_pending == 0
    finally:
        await puller.close()
