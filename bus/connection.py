"""The NATS connection policy: reconnect forever, drain on close."""

from __future__ import annotations

import logging

import nats
from nats.aio.client import Client

log = logging.getLogger(__name__)


async def connect(url: str, name: str, *, connect_timeout: float = 5.0) -> Client:
    """Connect with the reconnect policy every jetsource process uses."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error (%s): %s", name, exc)

    holder: list[Client] = []

    async def on_disconnect() -> None:
        if holder and (holder[0].is_closed or holder[0].is_draining):
            return  # our own drain/close, not an outage
        log.warning("nats disconnected (%s)", name)

    async def on_reconnect() -> None:
        log.info("nats reconnected (%s)", name)

    nc = await nats.connect(
        servers=url.split(","),
        name=name,
        connect_timeout=connect_timeout,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        allow_reconnect=True,
        pending_size=64 * 1024 * 1024,
        drain_timeout=10,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )
    holder.append(nc)
    return nc
