"""What a context's routes are made of: HTTP in, a NATS command or query out, the reply back
with the right status and headers. A context's route module (`http_edge/orders.py`) uses these;
nothing here knows a context."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
from aiohttp import web
from nats.aio.client import Client

from actors.history import parse_time, state_at
from actors.runtime import AggregateSpec
from actors.snapshots import Snapshots
from actors.upcasting import EventCodec
from bus import subjects as h
from bus.codec import decode_json, encode
from bus.errors import DeadlineError, ValidationError
from bus.eventstore import PartitionedStore, appended
from bus.subjects import Context
from http_edge.breaker import Breakers
from http_edge.errors import json_error

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    """What the edge needs to know, nothing more."""

    request_timeout: float = 5.0
    read_wait_timeout: float = 2.0
    max_body_bytes: int = 64 * 1024
    max_inflight: int = 2048
    rate_limit_per_s: float = 0.0
    api_tokens: tuple[str, ...] = ()
    api_read_tokens: tuple[str, ...] = ()
    metrics_open: bool = False
    breaker_failures: int = 5  # failures in a row that open a subject's breaker (0: never)
    breaker_cooldown_s: float = 5.0  # how long an open breaker refuses before its probe


NATS: web.AppKey[Client] = web.AppKey("nats", Client)
CONTEXTS: web.AppKey[dict[str, Context]] = web.AppKey("contexts", dict)
STORES: web.AppKey[dict[str, PartitionedStore]] = web.AppKey("stores", dict)
# Each context's aggregate (its fold and event codec): time travel and upcast history.
AGGREGATES: web.AppKey[dict[str, AggregateSpec[Any, Any, Any]]] = web.AppKey("aggregates", dict)
SNAPSHOTS: web.AppKey[dict[str, Snapshots | None]] = web.AppKey("snapshots", dict)  # per context, made on first use
CONFIG: web.AppKey[EdgeConfig] = web.AppKey("config", EdgeConfig)
BREAKERS: web.AppKey[Breakers] = web.AppKey("breakers", Breakers)  # one per subject the edge requests
TRACE_ID: web.RequestKey[str] = web.RequestKey("trace_id", str)


class _Written(msgspec.Struct):
    version: int
    seq: int


_written = msgspec.json.Decoder(_Written)


@functools.cache
def _id_decoder(id_key: str) -> msgspec.json.Decoder[Any]:
    """A created aggregate's reply: its version, sequence and id in one decode."""
    return msgspec.json.Decoder(msgspec.defstruct(f"Written_{id_key}", [(id_key, str)], bases=(_Written,)))


def _command_headers(request: web.Request) -> dict[str, str]:
    headers: dict[str, str] = {}
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        headers[h.IDEMPOTENCY_KEY] = key
    if_match = request.headers.get("If-Match")
    if if_match is not None:
        headers[h.EXPECTED_VERSION] = if_match.removeprefix("W/").strip().strip('"')
    headers[h.TRACE_ID] = request[TRACE_ID]
    return headers


def min_seq(request: web.Request) -> int | None:
    raw = request.query.get("min_seq") or request.headers.get("X-Min-Sequence")
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError("min_seq must be an integer", field="min_seq") from None
    if value < 0:
        raise ValidationError("min_seq must be >= 0", field="min_seq")
    return value


async def json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    body = decode_json(raw)
    if not isinstance(body, dict):
        raise ValidationError("request body must be a JSON object")
    return body


def written(request: web.Request, reply: bytes, status: int, location: tuple[str, str] | None = None) -> web.Response:
    """A command's reply: ETag (the new version), the stream sequence (for `min_seq`), and for a
    created resource its Location, `location` = (path prefix, id field of the reply)."""
    if location is None:
        info = _written.decode(reply)
    else:
        prefix, id_key = location
        info = _id_decoder(id_key).decode(reply)
    headers = {"ETag": f'"{info.version}"', "X-Stream-Sequence": str(info.seq), "X-Trace-Id": request[TRACE_ID]}
    if location is not None:
        headers["Location"] = f"{prefix}/{getattr(info, id_key)}"
    return web.Response(status=status, body=reply, content_type="application/json", headers=headers)


async def command(request: web.Request, context: str, name: str, body: bytes) -> bytes:
    """Send `<context>.cmd.<name>` with the request's key, expected version and trace id, through
    its subject's breaker: while that is open the command is refused unsent (nothing is done)."""
    app = request.app
    subject = app[CONTEXTS][context].command(name)
    try:
        return await app[BREAKERS][subject].request(app[NATS], body, _command_headers(request),
                                                    app[CONFIG].request_timeout)
    except DeadlineError as exc:
        # The command may have been stored just before its deadline (the actor stores nothing
        # after it): only a retry under the same key tells, and it never stores twice.
        raise DeadlineError(f"{exc.message}; the outcome is unknown: retry with the same Idempotency-Key "
                            "(a retried request is never stored twice and gets the first answer)") from None


async def query(request: web.Request, context: str, name: str, body: dict[str, Any]) -> bytes:
    """Send `<context>.query.<name>` through its subject's breaker."""
    app = request.app
    timeout = app[CONFIG].request_timeout + (app[CONFIG].read_wait_timeout if body.get("min_seq") else 0)
    subject = app[CONTEXTS][context].query(name)
    return await app[BREAKERS][subject].request(app[NATS], encode(body), None, timeout)


def list_query(request: web.Request, keys: tuple[str, ...]) -> dict[str, Any]:
    """A list query from the URL: the named filters, `limit` and `min_seq`."""
    out: dict[str, Any] = {k: request.query[k] for k in keys if k in request.query}
    if "limit" in request.query:
        try:
            out["limit"] = int(request.query["limit"])
        except ValueError:
            raise ValidationError("limit must be an integer", field="limit") from None
    if (seq := min_seq(request)) is not None:
        out["min_seq"] = seq
    return out


# ---- route builders -------------------------------------------------------------------------


def create(context: str, name: str, prefix: str, id_key: str, status: int = 201) -> Handler:
    """POST a new aggregate: the body is the command as it is; Location names the new one."""

    async def handler(request: web.Request) -> web.Response:
        reply = await command(request, context, name, await request.read())
        return written(request, reply, status, (prefix, id_key))

    handler.__name__ = f"{context}_{name}"
    return handler


def change(context: str, name: str, id_key: str, from_path: tuple[str, ...] = ()) -> Handler:
    """POST to one aggregate: the body (a JSON object, or none) plus its id (and any other
    `from_path` fields) from the URL."""

    async def handler(request: web.Request) -> web.Response:
        body = await json_object(request)
        for key in from_path:
            body[key] = request.match_info[key]
        body[id_key] = request.match_info[id_key]
        reply = await command(request, context, name, encode(body))
        return written(request, reply, 200)

    handler.__name__ = f"{context}_{name}"
    return handler


class _Version(msgspec.Struct):
    version: int


def get_one(context: str, id_key: str) -> Handler:
    """One aggregate's read-model view (`<context>.query.get`), its version as the ETag."""

    async def handler(request: web.Request) -> web.Response:
        body: dict[str, Any] = {id_key: request.match_info[id_key]}
        if (seq := min_seq(request)) is not None:
            body["min_seq"] = seq
        reply = await query(request, context, "get", body)
        version = msgspec.json.decode(reply, type=_Version).version
        return web.Response(body=reply, content_type="application/json", headers={"ETag": f'"{version}"'})

    handler.__name__ = f"{context}_get"
    return handler


def listing(context: str, name: str = "list", filters: tuple[str, ...] = ()) -> Handler:
    """A list (or stats) query with filters from the URL."""

    async def handler(request: web.Request) -> web.Response:
        reply = await query(request, context, name, list_query(request, filters))
        return web.Response(body=reply, content_type="application/json")

    handler.__name__ = f"{context}_{name}"
    return handler


class EventOut(msgspec.Struct, frozen=True, kw_only=True):
    """One stored event as `GET /{context}/{id}/events` shows it."""

    seq: int
    time: str
    type: str
    event: msgspec.Raw
    command_id: str | None = None
    trace_id: str | None = None
    correlation_id: str | None = None


class _Tag(msgspec.Struct):
    type: str = ""


def event_out(stored: Any, id_key: str, aggregate_id: str, codec: EventCodec[Any] | None = None) -> EventOut | None:
    """One stored event as history shows it (in its current shape when given its context's
    codec, else as stored); None for a message that is not one of this aggregate's appended
    events (a reply NATS was made to store on its subject, or a body that is not JSON, which a
    projection parks): history shows what the aggregate folds."""
    if not appended(stored.headers):
        return None
    try:
        tag: Any = msgspec.json.decode(stored.data, type=_tag_type(id_key))
    except msgspec.DecodeError:
        return None
    if getattr(tag, id_key) != aggregate_id:
        return None
    data = stored.data
    if codec is not None:
        with contextlib.suppress(msgspec.DecodeError):  # what no reader can decode is shown as stored
            data = codec.current_bytes(data)
    return EventOut(
        seq=stored.seq, time=stored.headers.get(h.EV_TIME, stored.time), type=tag.type,
        event=msgspec.Raw(data), command_id=stored.headers.get(h.EV_COMMAND_ID),
        trace_id=stored.headers.get(h.EV_TRACE_ID), correlation_id=stored.headers.get(h.EV_CORRELATION_ID),
    )


@functools.cache
def _tag_type(id_key: str) -> type:
    """What history reads of an event without knowing its context's types: its tag and the
    aggregate it names."""
    return msgspec.defstruct(f"Tag_{id_key}", [(id_key, str | None, None)], bases=(_Tag,))


def _int_query(request: web.Request, name: str, low: int, high: int | None = None) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError(f"{name} must be an integer", field=name) from None
    if value < low or (high is not None and value > high):
        raise ValidationError(f"{name} must be {low}..{high}" if high else f"{name} must be >= {low}", field=name)
    return value


def _aggregate_id(request: web.Request, id_key: str) -> str:
    aggregate_id = request.match_info[id_key]
    if not h.valid_token(aggregate_id):
        raise ValidationError(f"{id_key} must be 1..64 letters, digits, '-' or '_'", field=id_key)
    return aggregate_id


MAX_HISTORY_PAGE = 10_000


def history(context: str, id_key: str, noun: str) -> Handler:
    """The aggregate's events, straight from its stream: `from_seq` (a stream sequence),
    `since` (an ISO time), `limit` (then `next_from_seq` names the next page); each event in
    its current shape (upcast), or as stored with `form=stored`."""

    async def handler(request: web.Request) -> web.Response:
        aggregate_id = _aggregate_id(request, id_key)
        from_seq = _int_query(request, "from_seq", 1)
        limit = _int_query(request, "limit", 1, MAX_HISTORY_PAGE)
        since = parse_time(request.query["since"], "since") if "since" in request.query else None
        form = request.query.get("form", "current")
        if form not in ("current", "stored"):
            raise ValidationError("form must be current or stored", field="form")
        ctx = request.app[CONTEXTS][context]
        stored = await request.app[STORES][context].load(ctx.events(aggregate_id), after_seq=(from_seq or 1) - 1)
        spec = request.app[AGGREGATES].get(context)
        codec = EventCodec.of(spec.event_type) if spec is not None and form == "current" else None
        events = [out for e in stored if (out := event_out(e, id_key, aggregate_id, codec)) is not None]
        if not events and from_seq is None and since is None:
            return json_error(404, "not_found", f"{noun} {aggregate_id} has no events")
        kept, next_seq = page_of(events, since, limit)
        return web.Response(body=encode({id_key: aggregate_id, "events": kept, "next_from_seq": next_seq}),
                            content_type="application/json")

    handler.__name__ = f"{context}_events"
    return handler


def page_of(events: list[EventOut], since: datetime | None, limit: int | None) -> tuple[list[EventOut], int | None]:
    """The events stored at or after `since`, at most `limit`, and the next page's `from_seq`."""
    out: list[EventOut] = []
    for event in events:
        if since is not None and parse_time(event.time, "time") < since:
            continue
        if limit is not None and len(out) == limit:
            return out, event.seq
        out.append(event)
    return out, None


class StateOut(msgspec.Struct, frozen=True, kw_only=True):
    """An aggregate's state as folded from its stream, the version and time it reflects, and the
    snapshot the fold started from (null: from the first event)."""

    version: int
    time: str
    snapshot: int | None
    state: msgspec.Raw


def state(context: str, id_key: str, noun: str) -> Handler:
    """The aggregate's state folded from its stream (not the read model), now or as it was at
    `at_version` (a stream sequence) or `at_time` (an ISO time)."""

    async def handler(request: web.Request) -> web.Response:
        aggregate_id = _aggregate_id(request, id_key)
        at_version = _int_query(request, "at_version", 1)
        at_time = parse_time(request.query["at_time"], "at_time") if "at_time" in request.query else None
        spec = request.app[AGGREGATES][context]
        found = await state_at(request.app[STORES][context], spec, aggregate_id, noun, at_version=at_version,
                               at_time=at_time, snapshots=_snapshots(request.app, context))
        body = StateOut(version=found.version, time=found.time, snapshot=found.snapshot,
                        state=msgspec.Raw(encode(found.state)))
        return web.Response(body=b'{"%s":%s,%s' % (id_key.encode(), encode(aggregate_id), encode(body)[1:]),
                            content_type="application/json", headers={"ETag": f'"{found.version}"'})

    handler.__name__ = f"{context}_state"
    return handler


def _snapshots(app: web.Application, context: str) -> Snapshots | None:
    """The context's snapshot reader (none when its aggregate takes no snapshots)."""
    readers = app[SNAPSHOTS]
    if context not in readers:
        spec = app[AGGREGATES][context]
        readers[context] = Snapshots.of(app[NATS], spec, timeout=app[CONFIG].request_timeout)
    return readers[context]


def history_routes(router: web.UrlDispatcher, context: str, prefix: str, id_key: str, noun: str) -> None:
    """`GET {prefix}/events` (history) and `GET {prefix}/state` (time travel), e.g. prefix
    `/orders/{order_id}`: the routes every context's aggregate has."""
    router.add_get(f"{prefix}/events", history(context, id_key, noun))
    router.add_get(f"{prefix}/state", state(context, id_key, noun))
