"""Work queues on JetStream pull consumers: strict priority across queues, leases through ack
wait (extended with in-progress acks), delays through nak-with-delay. The ack policy of every
work item is decided at one boundary: `WorkItem`."""

from __future__ import annotations

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.errors import UnavailableError
from bus.pull import Puller
from bus.subjects import Context


class WorkItem:
    """One delivered work message and its acknowledgement verbs."""

    __slots__ = ("_nc", "_msg", "queue", "stream")

    def __init__(self, nc: Client, msg: Msg, queue: str, stream: str = "") -> None:
        self._nc = nc
        self._msg = msg
        self.queue = queue
        self.stream = stream  # the (partition) stream it is stored in

    @property
    def data(self) -> bytes:
        return self._msg.data

    @property
    def msg(self) -> Msg:
        """The delivered message (subject, headers, ack subject with its stream position)."""
        return self._msg

    async def ack(self) -> None:
        """Done with it (success, failure recorded, or stale)."""
        await self._nc.publish(self._msg.reply, b"+ACK")

    async def nak(self, delay_s: float = 0.0) -> None:
        """Put it back, to be delivered again after delay_s."""
        body = b"-NAK" if delay_s <= 0 else b"-NAK " + msgspec.json.encode({"delay": int(delay_s * 1e9)})
        await self._nc.publish(self._msg.reply, body)

    async def extend(self) -> None:
        """Still working: restart the lease (ack wait)."""
        await self._nc.publish(self._msg.reply, b"+WPI")


class PriorityQueues:
    """Takes the next items from the first non-empty queue, in priority order (one durable pull
    consumer per queue and partition, each pulled through its own `Puller`). One caller at a time.

    Over K partitions a queue is K consumers: every partition's items of a priority are taken
    before any of the next priority's, so strictness holds across partitions; which partition is
    asked first rotates, so none is starved when a queue holds more than one take's worth."""

    def __init__(self, nc: Client, ctx: Context, queues: tuple[str, ...], *, timeout: float = 5.0) -> None:
        self._nc = nc
        self._queues = [(q, [(part.stream, Puller(nc, part.stream, part.work_consumer(q), timeout=timeout))
                             for part in ctx.parts]) for q in queues]
        self._turn = 0

    async def take(self, n: int) -> list[WorkItem]:
        """Up to n items, highest priority first: all of the first queue's that fit (from every
        partition), then the next queue's. Callers start everything they take at once, so
        strictness holds."""
        items: list[WorkItem] = []
        failed: UnavailableError | None = None
        self._turn += 1
        for queue, pullers in self._queues:
            start = self._turn % len(pullers)
            for stream, puller in pullers[start:] + pullers[:start]:
                want = n - len(items)
                if want <= 0:
                    return items
                try:
                    items += [WorkItem(self._nc, msg, queue, stream) for msg in await puller.pull(want)]
                except UnavailableError as exc:
                    # One partition without a leader (an election) holds up only its own work:
                    # the other partitions' queues are taken as usual.
                    failed = exc
        if failed is not None and not items:
            raise failed
        return items

    async def next(self) -> WorkItem | None:
        items = await self.take(1)
        return items[0] if items else None

    async def close(self) -> None:
        for _, pullers in self._queues:
            for _, puller in pullers:
                await puller.close()
