"""NATS micro service plumbing: the one catch-all that turns a handler's outcome into a reply,
and bounded concurrency for request handlers."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from nats.micro.request import Request

from bus import metrics
from bus.codec import encode
from bus.errors import InternalError, JetsourceError
from bus.wire import error_reply

log = logging.getLogger(__name__)


# Reply subjects a service answers on: inboxes (`_INBOX.` and per-role `_INBOX.<role>.`) and
# replies mapped across accounts (`_R_.`). Any other reply subject is a caller's attempt to make
# the service publish where it may (its own event stream): such a request is not executed.
REPLY_PREFIXES = ("_INBOX.", "_R_.")


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


class _Slot:
    """One request's place under a Concurrency limit, given back once: when the request is
    done, or earlier when it only waits (`give_back_slot`)."""

    __slots__ = ("_owner", "_held")

    def __init__(self, owner: Concurrency) -> None:
        self._owner = owner
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._owner._slots.release()  # noqa: SLF001 - the two are one mechanism

    def done(self, task: asyncio.Task[None]) -> None:
        self._owner._tasks.discard(task)  # noqa: SLF001
        self.release()


_SLOT: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar("jetsource_request_slot", default=None)


def give_back_slot() -> None:
    """Free the current request's concurrency slot before it waits on something other than
    work (an order waiting for its saga's answer), so that waiting requests never starve the
    ones they wait for (the saga's answer comes through the same limit)."""
    slot = _SLOT.get()
    if slot is not None:
        slot.release()


class Concurrency:
    """Runs request handlers as tasks, at most `limit` at once.

    nats-py awaits a subscription's callbacks one at a time; handing each request to a task
    gives concurrency, and waiting for a free slot in the callback gives backpressure.
    """

    def __init__(self, limit: int) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task[None]] = set()

    def wrap(self, handler: Callable[[Request], Coroutine[Any, Any, None]]) -> Callable[[Request], Awaitable[None]]:
        async def spawn(request: Request) -> None:
            await self._slots.acquire()
            slot = _Slot(self)
            _SLOT.set(slot)  # the task below starts with a copy of this context
            task = asyncio.get_running_loop().create_task(handler(request))
            self._tasks.add(task)
            task.add_done_callback(slot.done)

        return spawn

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
