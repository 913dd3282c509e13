"""NATS micro service plumbing: the one catch-all that turns a handler's outcome into a reply,
and bounded concurrency for request handlers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro.request import Request
from nats.micro.service import Service, ServiceConfig

from bus import metrics
from bus.codec import encode
from bus.errors import InternalError, JetsourceError
from bus.wire import error_reply

log = logging.getLogger(__name__)


# Reply subjects a service answers on: inboxes (`_INBOX.` and per-role `_INBOX.<role>.`) and
# replies mapped across accounts (`_R_.`). Any other reply subject is a caller's attempt to make
# the service publish where it may (its own event stream): such a request is not executed.
REPLY_PREFIXES = ("_INBOX.", "_R_.")


class _Service(Service):
    """nats.micro's service, whose `$SRV` PING / INFO / STATS answers go to inboxes only, as
    every endpoint's do (`respond`). Services may answer wherever a request's reply subject
    points, whatever their publish denies (nats-server's `allow_responses`): without this, a
    role allowed to ask `$SRV.STATS` (the edge, for the dashboard) could make every service
    publish its stats on an event subject, the config bucket or a JetStream API subject."""

    async def _handle_ping_request(self, msg: Msg) -> None:
        if _to_inbox(msg):
            await super()._handle_ping_request(msg)

    async def _handle_info_request(self, msg: Msg) -> None:
        if _to_inbox(msg):
            await super()._handle_info_request(msg)

    async def _handle_stats_request(self, msg: Msg) -> None:
        if _to_inbox(msg):
            await super()._handle_stats_request(msg)


def _to_inbox(msg: Msg) -> bool:
    if msg.reply.startswith(REPLY_PREFIXES):
        return True
    log.warning("refused a %s whose reply subject %r is not an inbox", msg.subject, msg.reply[:200])
    return False


async def add_service(nc: Client, **config: Any) -> Service:
    """`nats.micro.add_service`, with `$SRV` answers to inboxes only (see `_Service`)."""
    service = _Service(nc, ServiceConfig(**config))
    await service.start()
    return service


async def respond(request: Request, handler: Callable[[], Any]) -> None:
    """Run a handler and send its reply; the one catch-all of the NATS transport."""
    reply = request._msg.reply  # noqa: SLF001 - nats.micro's Request does not expose it
    if not reply.startswith(REPLY_PREFIXES):
        metrics.COMMAND_ERRORS.labels(request.subject, "reply_refused").inc()
        log.warning("refused a request on %s whose reply subject %r is not an inbox", request.subject, reply[:200])
        return
    try:
        reply = await handler()
        await request.respond(reply if isinstance(reply, bytes) else encode(reply))
    except asyncio.CancelledError:
        raise
    except JetsourceError as exc:
        metrics.COMMAND_ERRORS.labels(request.subject, exc.code).inc()
        body, headers = error_reply(exc)
        await request.respond(body, headers=headers)
    except Exception:
        metrics.COMMAND_ERRORS.labels(request.subject, "internal").inc()
        log.exception("unexpected failure handling %s", request.subject)
        body, headers = error_reply(InternalError("internal error; see the service log"))
        await request.respond(body, headers=headers)


class Concurrency:
    """Runs request handlers as tasks, at most `limit` at once.

    nats-py awaits a subscription's callbacks one at a time; handing each request to a task
    gives concurrency, and waiting for a free slot in the callback gives backpressure. A
    request that only waits (an order waiting for its saga's answer) gives its slot back
    early (`give_back`), so waiting requests never starve the ones they wait for.
    """

    def __init__(self, limit: int) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task[None]] = set()
        self._given: set[asyncio.Task[Any]] = set()  # running, their slot already given back

    def wrap(self, handler: Callable[[Request], Coroutine[Any, Any, None]]) -> Callable[[Request], Awaitable[None]]:
        async def spawn(request: Request) -> None:
            await self._slots.acquire()
            task = asyncio.get_running_loop().create_task(handler(request))
            self._tasks.add(task)
            task.add_done_callback(self._done)

        return spawn

    def give_back(self) -> None:
        """Free the calling request's slot before it waits on something other than work (the
        answer it waits for comes through the same limit). Once; outside a request, nothing."""
        task = asyncio.current_task()
        if task in self._tasks and task not in self._given:
            self._given.add(task)
            self._slots.release()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._given and task in self._given:
            self._given.discard(task)
        else:
            self._slots.release()

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
