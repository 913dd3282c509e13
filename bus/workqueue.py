"""Work queues on JetStream pull consumers: strict priority across queues, leases through ack
wait (extended with in-progress acks), delays through nak-with-delay. The ack policy of every
work item is decided at one boundary: `WorkItem`."""

from __future__ import annotations

from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError

from bus.errors import UnavailableError



class WorkItem:
    """One delivered work message and its acknowledgement verbs."""

    __slots__ = ("_nc", "_msg", "queue")

    def __init__(self, nc: Client, msg: Msg, queue: str) -> None:
        self._nc = nc
        self._msg = msg
        self.queue = queue

    @property
    def data(self) -> bytes:
        return self._msg.data

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
    """Takes the next item from the first non-empty queue, in priority order.

    Pull responses carry the stored message's own subject, not the reply inbox, so they come
    through a dedicated inbox subscription rather than the client's request multiplexer. One
    caller at a time.
    """

    def __init__(self, nc: Client, stream: str, queues: tuple[str, ...], *, timeout: float = 5.0) -> None:
        self._nc = nc
        self._apis = [(q, f"$JS.API.CONSUMER.MSG.NEXT.{stream}.workers_{q}") for q in queues]
        self._timeout = timeout
        self._inbox = nc.new_inbox()
        self._sub: Any = None

    async def take(self, n: int) -> list[WorkItem]:
        """Up to n items, highest priority first: all of the first queue's that fit, then the
        next queue's. Callers start everything they take at once, so strictness holds."""
        if self._sub is None:
            self._sub = await self._nc.subscribe(self._inbox)
        items: list[WorkItem] = []
        for queue, api in self._apis:
            want = n - len(items)
            if want <= 0:
                break
            await self._nc.publish(api, b'{"batch":%d,"no_wait":true}' % want, reply=self._inbox)
            got = 0
            while got < want:
                try:
                    msg = await self._sub.next_msg(self._timeout)
                except NatsTimeoutError:
                    raise UnavailableError("JetStream did not answer a pull request in time") from None
                status = (msg.headers or {}).get("Status")
                if status is None:
                    items.append(WorkItem(self._nc, msg, queue))
                    got += 1
                elif status in ("404", "408"):
                    break  # the queue had fewer than we asked for: on to the next priority
                elif status == "503":
                    raise UnavailableError("JetStream is not answering")
        return items

    async def next(self) -> WorkItem | None:
        items = await self.take(1)
        return items[0] if items else None

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
