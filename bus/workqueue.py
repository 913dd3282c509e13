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

_NEXT = msgspec.json.encode({"batch": 1, "no_wait": True})


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

    async def next(self) -> WorkItem | None:
        if self._sub is None:
            self._sub = await self._nc.subscribe(self._inbox)
        for queue, api in self._apis:
            await self._nc.publish(api, _NEXT, reply=self._inbox)
            while True:
                try:
                    msg = await self._sub.next_msg(self._timeout)
                except NatsTimeoutError:
                    raise UnavailableError("JetStream did not answer a pull request in time") from None
                status = (msg.headers or {}).get("Status")
                if status is None:
                    return WorkItem(self._nc, msg, queue)
                if status in ("404", "408"):
                    break  # this queue is empty: try the next priority
                if status == "503":
                    raise UnavailableError("JetStream is not answering")
                # anything else (e.g. a late status of an earlier pull): keep reading
        return None

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
