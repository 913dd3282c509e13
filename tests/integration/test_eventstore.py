"""The event store's group commit against a real JetStream: one atomic batch for concurrent
commands, and when the batch is rejected only the stale writer fails."""

from __future__ import annotations

import pytest

import asyncio
from datetime import UTC, datetime

from bus.eventstore import EventStore, NewEvent, WrongExpectedSequence
from bus.streams import ensure_stream, event_stream
from bus.subjects import Context
from tests.conftest import System

# One stream's mechanics: they need no second run over partitions.
pytestmark = pytest.mark.single_stream


def _event(n: int) -> list[NewEvent]:
    return [NewEvent(b'{"n":%d}' % n, {})]


async def test_a_rejected_batch_is_retried_per_command_so_only_the_stale_writer_fails(system: System) -> None:
    ctx = Context("ledger", system.settings.namespace)
    await ensure_stream(system.nc.jetstream(), event_stream(ctx))
    store = EventStore(system.nc, ctx.stream, max_inflight_batches=1)
    first = await store.append(ctx.events("a"), _event(0), 0)
    assert (first.first_seq, first.last_seq) == (1, 1)

    # Three concurrent commands go out as one atomic batch; "a" expects an old version.
    outcomes = await asyncio.gather(
        store.append(ctx.events("a"), _event(1), 0),
        store.append(ctx.events("b"), _event(2), 0),
        store.append(ctx.events("c"), [*_event(3), *_event(4)], 0),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], WrongExpectedSequence)
    assert [o.last_seq - o.first_seq + 1 for o in outcomes[1:]] == [1, 2]  # type: ignore[union-attr]
    assert store.batches_split == 1

    # Concurrent writers that are all current share one batch and one fsync.
    ok = await asyncio.gather(*(store.append(ctx.events(f"x{i}"), _event(i), 0) for i in range(20)))
    assert store.batches_committed == 1
    seqs = sorted(r.first_seq for r in ok)
    assert seqs == list(range(seqs[0], seqs[0] + 20))  # one batch: contiguous, in order
    assert [e.data for e in await store.load(ctx.events("c"))] == [b'{"n":3}', b'{"n":4}']
    info = await system.nc.jetstream().stream_info(ctx.stream)
    assert info.state.messages == 1 + 3 + 20
    await store.close()


async def test_a_stream_read_starts_at_a_sequence_or_at_a_time(system: System) -> None:
    ctx = Context("ledger", system.settings.namespace)
    await ensure_stream(system.nc.jetstream(), event_stream(ctx))
    store = EventStore(system.nc, ctx.stream)
    for n in range(3):
        await store.append(ctx.events(f"e{n}"), _event(n), 0)
    await asyncio.sleep(0.05)
    cut = datetime.now(UTC)
    await asyncio.sleep(0.05)
    for n in range(3, 5):
        await store.append(ctx.events(f"e{n}"), _event(n), 0)

    everything = [e.data async for e in store.read(ctx.events_wildcard)]
    from_third = [e.seq async for e in store.read(ctx.events_wildcard, from_seq=3)]
    since_cut = [e.data async for e in store.read(ctx.events_wildcard, since=cut)]
    assert everything == [b'{"n":%d}' % n for n in range(5)]
    assert from_third == [3, 4, 5]
    assert since_cut == [b'{"n":3}', b'{"n":4}']
    await store.close()
