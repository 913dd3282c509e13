"""`/asyncapi.json` and `jetsource docs asyncapi`: an AsyncAPI 3.0 description of the NATS API
of the declared contexts, generated from the message Structs (msgspec's JSON schemas, as for
`/openapi.json`) and the subject grammar, so it cannot drift from the wire.

Each command and query subject is a channel the system receives requests on, answered on the
requester's inbox (a reply channel with no address) with the reply Struct or a coded error;
each context's events, outbox copies, work items and live signals are channels it sends on.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
import msgspec.inspect as ti

from actors.runtime import AggregateSpec
from actors.upcasting import EventCodec
from bus import subjects as h
from bus.errors import BY_CODE
from bus.subjects import PARTITION_PARAMETER, Context
from bus.wire import BatchReply, CommandBatch, ErrorReply
from http_edge.openapi import API_VERSION
from infra.contexts import BoundedContext, Declared, Parameter, Published, declared
from infra.settings import Settings

ASYNCAPI = "3.0.0"
SCHEMAS = "#/components/schemas/"
MESSAGES = "#/components/messages/"
ERROR = "ErrorReply"  # the one error message every request channel's reply channel carries

_PARAMETER = re.compile(r"\{(\w+)\}")


def asyncapi_document(settings: Settings) -> bytes:
    """The encoded document for the deployment these settings describe (namespace, partitions)."""
    return msgspec.json.encode(build(settings))


def build(settings: Settings) -> dict[str, Any]:
    found = declared(settings)
    doc = _Document(settings, found)
    for bc in found.contexts:
        doc.context(bc)
    return doc.finish()


def reply_type(spec: AggregateSpec[Any, Any, Any]) -> type | None:
    """The Struct a context's commands are answered with: the return annotation of its `reply`
    (None when it has none, e.g. a lambda)."""
    try:
        hints = typing.get_type_hints(spec.reply)
    except (NameError, TypeError):
        return None
    answer = hints.get("return")
    return answer if isinstance(answer, type) and issubclass(answer, msgspec.Struct) else None


def _summary(t: type) -> str:
    """The first paragraph of a Struct's docstring, on one line."""
    return " ".join((t.__doc__ or "").strip().split("\n\n")[0].split())


def _ref(pointer: str) -> dict[str, str]:
    return {"$ref": pointer}


def _header(description: str, **schema: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **schema}


_TRACE_HEADERS = {
    h.TRACE_ID: _header("the trace this request continues (a new one when absent); stored with its events"),
    h.CORRELATION_ID: _header("what the request is part of (default: the trace id)"),
    h.CAUSATION_ID: _header("the command that caused this one"),
    h.DEADLINE: _header("epoch milliseconds: past it the command is refused (`timeout`) and nothing is stored",
                        pattern=r"^[0-9]+$"),
}
# Header schemas are not Structs: they live beside the generated ones, under these names.
_HEADER_SCHEMAS: dict[str, dict[str, Any]] = {
    "CommandHeaders": {
        "type": "object",
        "description": "Optional headers of a command. NATS header values are strings.",
        "properties": {
            h.IDEMPOTENCY_KEY: _header("a retry with the same key and body stores nothing twice and gets the "
                                       "first answer; the same key with another request is `idempotency_key_reused`",
                                       minLength=1, maxLength=200),
            h.EXPECTED_VERSION: _header("the aggregate version expected (an integer), or * for any existing one; "
                                        "otherwise `precondition_failed`"),
            **_TRACE_HEADERS,
        },
    },
    "BatchCommandHeaders": {
        "type": "object",
        "description": "Optional headers of a `_batch` command: one trace and deadline for every item. Keys and "
                       "expected versions address one aggregate, so a batch ignores those headers (an item may "
                       "carry its own key in its body where its Struct has one).",
        "properties": _TRACE_HEADERS,
    },
    "ReplyHeaders": {
        "type": "object",
        "description": f"A success reply has no `{h.SERVICE_ERROR_CODE}` header (and its body no `error` field).",
        "not": {"required": [h.SERVICE_ERROR_CODE]},
    },
    "ErrorReplyHeaders": {
        "type": "object",
        "description": "A NATS micro error reply: what tells it from a success.",
        "required": [h.SERVICE_ERROR_CODE, h.SERVICE_ERROR],
        "properties": {
            h.SERVICE_ERROR_CODE: _header("an HTTP-like status of the error's code",
                                          enum=sorted({str(e.status) for e in BY_CODE.values()})),
            h.SERVICE_ERROR: _header("the error's message", maxLength=500),
        },
    },
    "EventHeaders": {
        "type": "object",
        "description": "Headers of a stored event, written by the actor that appended it (a message without "
                       f"`{h.EV_COMMAND_ID}` was not appended by an actor: readers ignore it).",
        "required": [h.EV_COMMAND_ID, h.EV_TRACE_ID],
        "properties": {
            h.EV_COMMAND_ID: _header("the command that stored it (its Idempotency-Key, when keyed)"),
            h.EV_TRACE_ID: _header("the command's trace"),
            h.EV_CORRELATION_ID: _header("the command's correlation (absent on an outbox copy when it is the "
                                         "trace id)"),
            h.EV_CAUSATION_ID: _header("the command's cause, when it named one"),
            h.EV_TIME: _header("when the actor stored it (on events, not on outbox copies)", format="date-time"),
            h.EV_REQUEST_HASH: _header("a digest of the keyed request that stored it"),
            h.MSG_ID: _header("JetStream's dedupe id of a keyed command's event"),
        },
    },
}


class _Document:
    """The channels, operations and messages of one deployment, and the Structs they refer to."""

    def __init__(self, settings: Settings, found: Declared) -> None:
        self._settings = settings
        self._found = found
        self.channels: dict[str, Any] = {}
        self.operations: dict[str, Any] = {}
        self.messages: dict[str, Any] = {ERROR: {
            "name": "error",
            "title": "ErrorReply",
            "summary": "A coded error instead of the reply.",
            "description": "`error.code` is stable, `field` names the offending field where there is one. Codes "
                           "and their statuses (the header): "
                           + ", ".join(f"`{code}` {cls.status}" for code, cls in BY_CODE.items()) + ".",
            "headers": _ref(SCHEMAS + "ErrorReplyHeaders"),
            "payload": ErrorReply,
        }}
        # Structs decoded on their own (bodies, a batch's items): a tagged one's tag is optional there.
        self._requests: list[type] = []

    # ---- per context ------------------------------------------------------------------------

    def context(self, bc: BoundedContext) -> None:
        settings = self._settings
        ctx = bc.context(settings)
        spec = bc.spec(settings)
        answer = reply_type(spec)
        public = set(bc.public_edge_commands(settings))
        for name, command in spec.commands.items():
            self._request(bc, ctx, "cmd", name, command, answer, "CommandHeaders", name in public)
        for name in spec.batchable:
            batch = f"{name}_batch"
            self._request(bc, ctx, "cmd", batch, CommandBatch[spec.commands[name]],  # type: ignore[name-defined]
                          BatchReply[answer] if answer is not None else None,  # type: ignore[valid-type]
                          "BatchCommandHeaders", batch in public,
                          summary=f"Many `{name}` commands in one request: each item is executed as if sent "
                                  "alone, and `results` answers them in order")
        for name, query in (bc.read_model.queries if bc.read_model else {}).items():
            self._request(bc, ctx, "query", name, query.request, query.reply, None, True)
        events = self._event_messages(spec)
        self._events(bc, ctx, events, EventCodec.of(spec.event_type).tag_field)
        self._outbox(bc, ctx, events)
        for published in bc.publishes:
            self._published(bc, ctx, published)

    def _request(self, bc: BoundedContext, ctx: Context, kind: str, name: str, request: Any, reply: Any,
                 headers: str | None, public: bool, *, summary: str | None = None) -> None:
        cid = f"{bc.name}.{kind}.{name}"
        summary = summary if summary is not None else _summary(request)
        self._requests.append(typing.get_args(request)[0] if typing.get_origin(request) else request)
        message: dict[str, Any] = {"name": f"{cid}.request", "title": _title(request), "payload": request}
        if summary:
            message["summary"] = summary
        if headers is not None:
            message["headers"] = _ref(SCHEMAS + headers)
        answer: dict[str, Any] = {"name": f"{cid}.reply", "headers": _ref(SCHEMAS + "ReplyHeaders")}
        if reply is not None:
            answer.update(title=_title(reply), payload=reply)
        else:
            answer.update(summary="a JSON reply; the context declares no type for it", payload={})
        self.channels[cid] = {"address": ctx.command(name) if kind == "cmd" else ctx.query(name),
                              "messages": {"request": message}}
        self.channels[f"{cid}.reply"] = {
            "address": None,
            "description": "The requester's inbox: the reply subject of the request (NATS request-reply).",
            "messages": {"reply": answer, "error": _ref(MESSAGES + ERROR)},
        }
        who = self._senders(bc, ctx, name) if kind == "cmd" else []
        if kind == "query":
            access = "A query answered from the read model; the HTTP edge may send it."
        elif public:
            access = "Public: the HTTP edge may send it."
        else:
            access = ("Internal: the HTTP edge may not send it; NATS permissions let only "
                      + (", ".join(who) if who else "the roles that declare it") + " (and the admin) publish it.")
        operation: dict[str, Any] = {
            "action": "receive",
            "channel": _ref(f"#/channels/{cid}"),
            "description": access,
            "tags": [{"name": bc.name}, {"name": "command" if kind == "cmd" else "query"}]
                    + ([] if kind == "query" or public else [{"name": "internal"}]),
            "messages": [_ref(f"#/channels/{cid}/messages/request")],
            "reply": {"channel": _ref(f"#/channels/{cid}.reply"),
                      "messages": [_ref(f"#/channels/{cid}.reply/messages/reply"),
                                   _ref(f"#/channels/{cid}.reply/messages/error")]},
        }
        if summary:
            operation["summary"] = summary
        self.operations[cid] = operation

    def _senders(self, bc: BoundedContext, ctx: Context, name: str) -> list[str]:
        """Who is allowed to send an internal command: the process managers that declare it, and
        the context's roles whose permissions name it (the workers)."""
        managers = [pm.name for pm in self._found.managers if name in pm.sends.get(bc.name, ())]
        subject = ctx.command(name)
        roles = [r.name for r in bc.roles if subject in r.permissions(ctx, self._settings)["publish"]["allow"]]
        return managers + roles

    def _event_messages(self, spec: AggregateSpec[Any, Any, Any]) -> dict[str, Any]:
        """The context's event Structs as component messages (by class name), and refs to them."""
        info = ti.type_info(EventCodec.of(spec.event_type).event_type)
        refs: dict[str, Any] = {}
        for st in info.types if isinstance(info, ti.UnionType) else (info,):
            assert isinstance(st, ti.StructType)  # the codec refuses anything else
            key = st.cls.__name__ if st.cls.__name__ not in self.messages else f"{st.cls.__module__}.{st.cls.__name__}"
            message: dict[str, Any] = {"name": str(st.tag), "title": st.cls.__name__,
                                       "headers": _ref(SCHEMAS + "EventHeaders"), "payload": st.cls}
            if summary := _summary(st.cls):
                message["summary"] = summary
            self.messages[key] = message
            refs[key] = _ref(MESSAGES + key)
        return refs

    def _events(self, bc: BoundedContext, ctx: Context, events: dict[str, Any], tag_field: str) -> None:
        cid = f"{bc.name}.events"
        ident = _id_field(bc)
        address = ctx.events_address(ident)
        self.channels[cid] = {
            "address": address,
            "title": f"{bc.name} events",
            "description": (
                f"One aggregate's events, in order, in the stream {_streams(ctx)}: the source of truth. "
                f"`{ctx.events_wildcard}` covers every event of the context. The tag field is `{tag_field}`; `v` is the "
                "event type's schema version, stored with it: these schemas are the current versions (readers "
                "upcast events stored at older ones)." + _partition_note(ctx)),
            "parameters": self._parameters(address, {ident: Parameter(f"the aggregate's id (`{ident}`)")}),
            "messages": events,
        }
        self._sends(bc, cid, events, f"The {bc.name} actor stores a command's events atomically; read them "
                                     "through a JetStream consumer or Direct Get", "event")

    def _outbox(self, bc: BoundedContext, ctx: Context, events: dict[str, Any]) -> None:
        """The outbox subjects the declared process managers read (each carries copies of one kind
        of the context's events)."""
        names: list[str] = []
        readers: list[str] = []
        for pm in self._found.managers:
            for name in pm.consumes.get(bc.name, ()):
                names += [] if name in names else [name]
                readers += [] if pm.name in readers else [pm.name]
        if not names:
            return
        cid = f"{bc.name}.outbox"
        address = ctx.outbox_address("name")
        self.channels[cid] = {
            "address": address,
            "title": f"{bc.name} outbox",
            "description": (
                "Transactional outbox: copies of one kind of the context's events per subject, stored in the same "
                f"atomic batch as the event (stream {_streams(ctx)}), with its command, trace, correlation and "
                f"causation ids. Read by {', '.join(readers)}." + _partition_note(ctx)),
            "parameters": self._parameters(address, {"name": Parameter("which events' copies", tuple(names))}),
            "messages": events,
        }
        self._sends(bc, cid, events, "Copies of events for process managers, filtered server-side", "event")

    def _sends(self, bc: BoundedContext, cid: str, messages: Iterable[str], summary: str, *tags: str) -> None:
        self.operations[cid] = {
            "action": "send",
            "channel": _ref(f"#/channels/{cid}"),
            "summary": summary,
            "tags": [{"name": bc.name}, *({"name": t} for t in tags)],
            "messages": [_ref(f"#/channels/{cid}/messages/{key}") for key in messages],
        }

    def _published(self, bc: BoundedContext, ctx: Context, published: Published) -> None:
        cid = f"{bc.name}.{published.name}"
        address = published.address(ctx)
        message: dict[str, Any] = {"name": cid}
        if published.payload is not None:
            message.update(title=published.payload.__name__, payload=published.payload)
        else:
            message["description"] = "An empty body: the subject is the signal."
        # Would it carry a partition token (a work queue, not a live signal)?
        partitioned = PARTITION_PARAMETER in _PARAMETER.findall(published.address(Context(ctx.name, partitions=2)))
        self.channels[cid] = {
            "address": address,
            "description": published.summary + "." + (_partition_note(ctx) if partitioned else ""),
            "messages": {"message": message},
        }
        if parameters := self._parameters(address, published.parameters):
            self.channels[cid]["parameters"] = parameters
        self._sends(bc, cid, ["message"], published.summary)

    def _parameters(self, address: str, described: Mapping[str, Parameter]) -> dict[str, Any]:
        """A channel's parameters: every `{name}` in its address, described (a partition's by the
        grammar), and nothing else."""
        out: dict[str, Any] = {}
        for name in _PARAMETER.findall(address):
            if name == PARTITION_PARAMETER:
                k = self._settings.partitions
                out[name] = {"description": f"the aggregate's partition: FNV-1a (32 bit) of its id's UTF-8 bytes, "
                                            f"modulo {k}", "enum": [str(p) for p in range(k)]}
            elif name in described:
                out[name] = {"description": described[name].description}
                if described[name].enum:
                    out[name]["enum"] = list(described[name].enum)
            else:
                raise ValueError(f"{address}: parameter {name!r} is not described")
        return out

    # ---- the document ---------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Every Struct referred to becomes a reference to its generated schema component."""
        types: list[Any] = []

        def collect(node: Any) -> None:
            if isinstance(node, dict):
                for value in node.values():
                    collect(value)
            elif _is_type(node) and node not in types:
                types.append(node)

        collect(self.channels)
        collect(self.messages)
        refs, components = msgspec.json.schema_components(types, ref_template=SCHEMAS + "{name}")
        by_type = dict(zip(types, refs, strict=True))
        for request in self._requests:
            _tag_optional(components, request)
        for schema in components.values():
            _drop_discriminators(schema)
        clash = sorted(set(_HEADER_SCHEMAS) & set(components))
        if clash:
            raise ValueError(f"Structs named like the header schemas: {clash}; rename them")

        def replace(node: Any) -> Any:
            if isinstance(node, dict):
                return {k: replace(v) for k, v in node.items()}
            return by_type[node] if _is_type(node) else node

        settings = self._settings
        return {
            "asyncapi": ASYNCAPI,
            "info": {
                "title": "jetsource NATS API",
                "version": API_VERSION,
                "description": _INFO.format(namespace=f"`{settings.namespace}.`" if settings.namespace else "none",
                                            partitions=settings.partitions),
            },
            "defaultContentType": "application/json",
            "channels": replace(self.channels),
            "operations": self.operations,
            "components": {"schemas": {**components, **_HEADER_SCHEMAS}, "messages": replace(self.messages)},
        }


_INFO = """Commands, queries and events of the declared bounded contexts on NATS. Bodies are JSON (a live \
signal's may be empty).

* **Commands and queries** are NATS request-reply (`nats req`, any client's `request`): the reply goes \
to the request's reply subject, an inbox. A success reply is the reply schema; an error reply carries \
the header `Nats-Service-Error-Code` (an HTTP-like status) and `Nats-Service-Error`, and its body is \
`{{"error": {{"code", "message", "field"}}}}`. Success replies never contain `error` and never start with `-`. \
With no service listening, NATS itself answers at once with a `503` no-responders status.
* **Events** are stored in JetStream, one subject per aggregate; outbox copies, work items and live \
signals are published by the actors.
* The servers are the deployment's NATS (`JETSOURCE_NATS_URL`; `jetsource up`: nats://127.0.0.1:4222). \
The bus needs an identity (user and password, credentials or nkey); each role may publish only what \
it needs (`jetsource nats-config`). Subject prefix (namespace) of this deployment: {namespace}; \
partitions per context: {partitions}.
"""


def _is_type(node: Any) -> bool:
    return isinstance(node, type) or typing.get_origin(node) is not None


def _title(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin is None:
        return str(t.__name__)
    return f"{origin.__name__}[{', '.join(a.__name__ for a in typing.get_args(t))}]"


def _tag_optional(components: dict[str, Any], request: type) -> None:
    """A tagged Struct decoded on its own (a command's or a query's body, a batch's items) does
    not need its tag: msgspec checks the tag only when it is there. Its schema says so."""
    info = ti.type_info(request)
    if not isinstance(info, ti.StructType) or info.tag_field is None:
        return
    # msgspec names a component by its class, qualified by its module when two classes share a name.
    name = request.__name__ if request.__name__ in components else f"{request.__module__}.{request.__qualname__}"
    required = components[name].get("required", [])
    if info.tag_field in required:
        required.remove(info.tag_field)


def _drop_discriminators(node: Any) -> None:
    """msgspec marks tagged unions with OpenAPI's discriminator object; AsyncAPI 3.0's is a
    property name with another meaning. Each member's tag (an enum of one) already tells them
    apart, so it goes."""
    if isinstance(node, dict):
        if isinstance(node.get("discriminator"), dict):
            del node["discriminator"]
        for value in node.values():
            _drop_discriminators(value)
    elif isinstance(node, list):
        for value in node:
            _drop_discriminators(value)


def _id_field(bc: BoundedContext) -> str:
    """The name of the aggregate id (the last token of an event's subject): as the behaviour suite
    and the `get` query name it."""
    if bc.contract is not None:
        return bc.contract.id_field
    for query in (bc.read_model.queries if bc.read_model else {}).values():
        if query.aggregate is not None:
            return query.aggregate
    return "id"


def _streams(ctx: Context) -> str:
    return ", ".join(f"`{s}`" for s in ctx.streams)


def _partition_note(ctx: Context) -> str:
    if ctx.partitioned:
        return (f" Partitioned: {ctx.partitions} streams, and `{{{PARTITION_PARAMETER}}}` is the partition of the "
                "aggregate's id.")
    return (" With partitioned streams (`JETSOURCE_PARTITIONS` > 1) a token naming the partition of the "
            "aggregate's id comes before the last one.")
