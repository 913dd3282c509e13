"""The operator's dashboard at `/dashboard`: a page (static assets shipped in the package, no
build step) fed by server-sent events (`/dashboard/events`), each a snapshot of the system taken
from NATS once a second while at least one page is open (none is taken otherwise):

* services from `$SRV.STATS` (instances, requests, errors, processing time; each actor's event
  store writes and the commands they carried — the group commit's batch size — and each query
  service's projectors: checkpoint and lag);
* each event stream's messages and last sequence (JetStream stream info), and the parked events;
* the task queues by priority (depth, oldest wait), running tasks with their progress, dead
  letters, and the recent aggregates of each context with a `list` query (read-model queries);
* this edge's circuit breakers.

Rates and the charts are the page's work: it keeps the snapshots' deltas. The page is behind the
edge's auth: a bearer token, or the `jetsource_token` cookie `/dashboard/session` sets from one
(writes with the cookie must carry `X-Jetsource-Dashboard: 1`, which no other site's page can
send: the edge answers no CORS preflight)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import msgspec
from aiohttp import web
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError

from bus import parking
from bus import subjects as h
from bus.client import call
from bus.errors import JetsourceError
from bus.subjects import Context, Parked
from http_edge.breaker import Breakers

log = logging.getLogger(__name__)

INTERVAL_S = 1.0  # one snapshot a second while a page is open
STATS_EVERY_S = 5.0  # the task counts (a count over the whole tasks table) less often
SRV_WAIT_S = 0.25  # how long $SRV.STATS answers are gathered
QUERY_TIMEOUT_S = 2.0
COOKIE = "jetsource_token"
CSRF_HEADER = "X-Jetsource-Dashboard"
PATHS = ("/dashboard", "/dashboard/events", "/dashboard/static/dashboard.js", "/dashboard/static/dashboard.css")
OPEN_PATHS = ("/dashboard/login", "/dashboard/session")  # the login page and the token exchange
_STATIC = {"dashboard.js": "application/javascript", "dashboard.css": "text/css"}


@dataclass(frozen=True)
class Recent:
    """A context whose newest aggregates the page lists (`<context>.query.list`), each opening its
    history at `<prefix>/<id>/events`."""

    context: str
    id_field: str
    prefix: str


@dataclass(frozen=True)
class DashboardConfig:
    recent: tuple[Recent, ...] = ()
    tasks: str | None = "tasks"  # the task context (queues, running, dead letters), if declared
    parked: Parked | None = None


class Dashboard:
    """Takes a snapshot every `interval_s` while pages are listening, and hands each the latest."""

    def __init__(self, nc: Client, contexts: dict[str, Context], breakers: Breakers, config: DashboardConfig,
                 interval_s: float = INTERVAL_S) -> None:
        self._nc = nc
        self._contexts = contexts
        self._breakers = breakers
        self._config = config
        self._interval = interval_s
        self._listeners: set[asyncio.Queue[bytes | None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._stats: tuple[float, Any] | None = None  # (when, the task counts)
        self.snapshots = 0

    def listen(self) -> asyncio.Queue[bytes | None]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1)
        self._listeners.add(queue)
        if self._loop is None or self._loop.done():
            # In a context of its own: it outlives the page's request, whose trace it is not.
            self._loop = asyncio.get_running_loop().create_task(self._run(), context=contextvars.Context())
        return queue

    def leave(self, queue: asyncio.Queue[bytes | None]) -> None:
        self._listeners.discard(queue)

    async def close(self, _app: web.Application | None = None) -> None:
        for queue in list(self._listeners):
            _put_latest(queue, None)
        self._listeners.clear()
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)

    async def _run(self) -> None:
        while self._listeners:
            started = time.monotonic()
            try:
                data = msgspec.json.encode(await self.snapshot())
            except Exception:  # noqa: BLE001 - a bad snapshot must not end the page's feed
                log.exception("dashboard: taking a snapshot failed")
                data = None
            if data is not None:
                self.snapshots += 1
                for queue in list(self._listeners):
                    _put_latest(queue, data)
            await asyncio.sleep(max(0.05, self._interval - (time.monotonic() - started)))

    async def snapshot(self) -> dict[str, Any]:
        """The system now, as plain data (each section says its error instead when it failed)."""
        config = self._config
        sections: dict[str, Any] = {
            "services": self._services(),
            "streams": self._streams(),
        }
        if config.tasks and config.tasks in self._contexts:
            tasks = self._contexts[config.tasks]
            sections["task_stats"] = self._task_stats(tasks)
            sections["running"] = self._query(tasks, "list", {"status": "running", "limit": 20})
            sections["dead"] = self._query(tasks, "list", {"status": "dead", "limit": 20})
        for recent in config.recent:
            if recent.context in self._contexts:
                sections[f"recent:{recent.context}"] = self._query(self._contexts[recent.context], "list", {"limit": 8})
        if config.parked is not None:
            sections["parked"] = self._parked(config.parked)
        sections["circuits"] = self._circuits()
        names = list(sections)
        started = time.perf_counter()
        results = await asyncio.gather(*sections.values(), return_exceptions=True)
        out: dict[str, Any] = {"time": time.time(), "interval_s": self._interval,
                               "took_s": round(time.perf_counter() - started, 3),
                               "recent": [{"context": r.context, "id_field": r.id_field, "prefix": r.prefix}
                                          for r in config.recent if r.context in self._contexts]}
        for name, result in zip(names, results, strict=True):
            out[name] = {"error": _describe(result)} if isinstance(result, BaseException) else result
        return out

    async def _circuits(self) -> list[dict[str, Any]]:
        return [msgspec.structs.asdict(c) for c in self._breakers.states()]

    async def _task_stats(self, tasks: Context) -> Any:
        """The task counts, asked for every `STATS_EVERY_S` only: they count every task the read
        model holds (the lists are index lookups, asked for every snapshot)."""
        now = time.monotonic()
        if self._stats is None or now - self._stats[0] >= STATS_EVERY_S:
            self._stats = (now, await self._query(tasks, "stats", {}))
        return self._stats[1]

    async def _services(self) -> list[dict[str, Any]]:
        """Every micro-service instance's `$SRV.STATS`."""
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox)
        found: list[dict[str, Any]] = []
        try:
            await self._nc.publish("$SRV.STATS", b"", reply=inbox)
            deadline = time.monotonic() + SRV_WAIT_S
            while (left := deadline - time.monotonic()) > 0:
                try:
                    msg = await sub.next_msg(left)
                except NatsTimeoutError:
                    break
                if msg.headers and h.STATUS in msg.headers:
                    break  # no responders: nothing runs
                found.append(msgspec.json.decode(msg.data))
        finally:
            await sub.unsubscribe()
        return found

    async def _streams(self) -> list[dict[str, Any]]:
        js = self._nc.jetstream()
        names = [(ctx.name, stream) for ctx in self._contexts.values() for stream in ctx.streams]
        infos = await asyncio.gather(*(js.stream_info(stream) for _, stream in names), return_exceptions=True)
        out: list[dict[str, Any]] = []
        for (context, stream), info in zip(names, infos, strict=True):
            if isinstance(info, BaseException):
                out.append({"context": context, "stream": stream, "error": _describe(info)})
            else:
                out.append({"context": context, "stream": stream, "messages": info.state.messages,
                            "last_seq": info.state.last_seq, "bytes": info.state.bytes})
        return out

    async def _query(self, ctx: Context, name: str, body: dict[str, Any]) -> Any:
        return msgspec.json.decode(await call(self._nc, ctx.query(name), msgspec.json.encode(body),
                                              timeout=QUERY_TIMEOUT_S))

    async def _parked(self, parked: Parked) -> dict[str, Any]:
        """How many events each reader parked, and the first 20 (by reader, stream, sequence)."""
        entries = await parking.listed(self._nc, parked)
        by_reader: dict[str, int] = {}
        for reader, _, _ in entries:
            by_reader[reader] = by_reader.get(reader, 0) + 1
        return {"count": len(entries), "by_reader": by_reader,
                "first": [{"reader": r, "stream": s, "seq": q} for r, s, q in entries[:20]]}


def _put_latest(queue: asyncio.Queue[bytes | None], item: bytes | None) -> None:
    """A slow page gets the newest snapshot, not a backlog."""
    with contextlib.suppress(asyncio.QueueEmpty):
        if queue.full():
            queue.get_nowait()
    queue.put_nowait(item)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, JetsourceError):
        return exc.message
    if isinstance(exc, NatsError | TimeoutError):
        return f"{type(exc).__name__}: {exc}".rstrip(": ")
    return type(exc).__name__


DASHBOARD: web.AppKey[Dashboard] = web.AppKey("dashboard", Dashboard)


def _asset(name: str) -> bytes:
    return resources.files("http_edge").joinpath("static", name).read_bytes()


def _html(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=_asset(name), content_type="text/html",
                            headers={"Cache-Control": "no-store", **_SECURITY_HEADERS})

    return serve


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _STATIC:
        raise web.HTTPNotFound(text=f"no dashboard asset {name}")
    return web.Response(body=_asset(name), content_type=_STATIC[name], headers={"Cache-Control": "no-cache"})


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one `data:` line of JSON per snapshot, and a comment every 15 s of
    silence (proxies keep the stream open)."""
    dashboard = request.app[DASHBOARD]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    queue = dashboard.listen()
    try:
        while True:
            try:
                data = await asyncio.wait_for(queue.get(), 15)
            except TimeoutError:
                await response.write(b": still here\n\n")
                continue
            if data is None:  # the edge is shutting down
                break
            await response.write(b"data: " + data + b"\n\n")
    except (ConnectionResetError, ConnectionError):
        pass  # the page went away
    finally:
        dashboard.leave(queue)
    return response


_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def routes(router: web.UrlDispatcher) -> None:
    router.add_get("/dashboard", _html("dashboard.html"))
    router.add_get("/dashboard/login", _html("login.html"))
    router.add_get("/dashboard/events", events)
    router.add_get("/dashboard/static/{name}", static)


def setup(app: web.Application, nc: Client, contexts: dict[str, Context], breakers: Breakers,
          config: DashboardConfig, session: Any, interval_s: float = INTERVAL_S) -> None:
    """Add the dashboard to an edge app; `session` is the handler of `POST /dashboard/session`
    (the guards know the tokens)."""
    dashboard = Dashboard(nc, contexts, breakers, config, interval_s)
    app[DASHBOARD] = dashboard
    routes(app.router)
    app.router.add_post("/dashboard/session", session)
    app.on_shutdown.append(dashboard.close)


__all__: Sequence[str] = ("COOKIE", "CSRF_HEADER", "Dashboard", "DashboardConfig", "Recent", "setup")
