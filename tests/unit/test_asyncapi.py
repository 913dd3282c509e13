"""The AsyncAPI document (`/asyncapi.json`, `jetsource docs asyncapi`) is valid AsyncAPI 3.0 and
says what the wire does: every declared context's command, query and event subjects, with the
schemas msgspec derives from the Structs the services decode and encode."""

from __future__ import annotations

import copy
import json
import re
import typing
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from actors.errors import NotFoundError
from actors.orders.messages import OrderAccepted, OrderEvent, PlaceOrder
from actors.upcasting import EventCodec
from bus import subjects as h
from bus.subjects import Context
from bus.wire import error_reply
from infra.asyncapi import asyncapi_document, build, reply_type
from infra.contexts import declared
from infra.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
ASYNCAPI_SCHEMA = json.loads((ROOT / "tests" / "data" / "asyncapi-3.0.0.json").read_text())

DEPLOYMENTS = {
    "built-in": {},
    "loyalty, 4 partitions, a namespace": {"context_modules": "examples.loyalty", "partitions": 4, "namespace": "ns"},
}


class Holder(msgspec.Struct):
    """A Struct with a field of a tagged union (msgspec marks it with a discriminator)."""

    event: OrderEvent


def _settings(**extra: Any) -> Settings:
    return Settings(_env_file=None, **extra)


def _doc(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(asyncapi_document(_settings(**extra)))
    return doc


def _validator() -> Any:
    cls = jsonschema.validators.validator_for(ASYNCAPI_SCHEMA)
    assert cls is jsonschema.Draft7Validator  # what the AsyncAPI schema declares
    cls.check_schema(ASYNCAPI_SCHEMA)
    return cls(ASYNCAPI_SCHEMA, format_checker=cls.FORMAT_CHECKER)


def _at(doc: dict[str, Any], pointer: str) -> Any:
    assert pointer.startswith("#/"), pointer
    node: Any = doc
    for part in pointer[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _deref(doc: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and set(node) == {"$ref"}:
        node = _at(doc, node["$ref"])
    return node


def _schema_validator(doc: dict[str, Any], schema: dict[str, Any]) -> Any:
    """A validator of a payload or headers against one of the document's schemas (msgspec writes
    JSON Schema 2020-12; its refs point into the document's components)."""
    return jsonschema.Draft202012Validator({**schema, "components": doc["components"]})


@pytest.mark.parametrize("extra", DEPLOYMENTS.values(), ids=DEPLOYMENTS.keys())
def test_the_document_is_valid_asyncapi_3(extra: dict[str, Any]) -> None:
    doc = _doc(**extra)
    validator = _validator()
    errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(doc)]
    assert errors == []
    assert doc["asyncapi"] == "3.0.0"
    # The validator does look: an operation that is neither sent nor received is refused.
    broken = copy.deepcopy(doc)
    broken["operations"]["orders.cmd.place"]["action"] = "publish"
    assert not validator.is_valid(broken)


@pytest.mark.parametrize("extra", DEPLOYMENTS.values(), ids=DEPLOYMENTS.keys())
def test_every_reference_resolves_and_every_operation_names_its_channels_messages(extra: dict[str, Any]) -> None:
    doc = _doc(**extra)
    refs = re.findall(r'"\$ref":"([^"]+)"', json.dumps(doc, separators=(",", ":")))
    assert refs
    for ref in refs:
        _at(doc, ref)
    for oid, op in doc["operations"].items():
        channel = op["channel"]["$ref"]
        assert all(m["$ref"].startswith(channel + "/messages/") for m in op["messages"]), oid
        if "reply" in op:
            reply = op["reply"]["channel"]["$ref"]
            assert all(m["$ref"].startswith(reply + "/messages/") for m in op["reply"]["messages"]), oid


@pytest.mark.parametrize("extra", DEPLOYMENTS.values(), ids=DEPLOYMENTS.keys())
def test_every_command_and_query_of_every_context_has_request_reply_and_error(extra: dict[str, Any]) -> None:
    settings = _settings(**extra)
    doc = _doc(**extra)
    schemas = doc["components"]["schemas"]
    found = declared(settings)
    assert {c.name for c in found.contexts} >= ({"orders", "tasks", "inventory"}
                                                | ({"loyalty"} if extra.get("context_modules") else set()))
    for bc in found.contexts:
        ctx = bc.context(settings)
        spec = bc.spec(settings)
        public = bc.public_edge_commands(settings)
        requests: dict[str, tuple[str, Any, Any]] = {}
        for name, command in spec.commands.items():
            requests[f"{bc.name}.cmd.{name}"] = (ctx.command(name), command, reply_type(spec))
        for name in spec.batchable:
            requests[f"{bc.name}.cmd.{name}_batch"] = (ctx.command(f"{name}_batch"), None, None)
        for name, query in (bc.read_model.queries if bc.read_model else {}).items():
            requests[f"{bc.name}.query.{name}"] = (ctx.query(name), query.request, query.reply)
        assert len(requests) > 2
        for cid, (subject, request, reply) in requests.items():
            channel = doc["channels"][cid]
            assert channel["address"] == subject
            message = channel["messages"]["request"]
            if request is not None:
                assert message["payload"] == {"$ref": f"#/components/schemas/{request.__name__}"}
            else:
                assert message["payload"]["$ref"].startswith("#/components/schemas/CommandBatch_")
            answers = doc["channels"][f"{cid}.reply"]
            assert answers["address"] is None  # the requester's inbox
            assert set(answers["messages"]) == {"reply", "error"}
            if reply is not None:
                assert answers["messages"]["reply"]["payload"] == {"$ref": f"#/components/schemas/{reply.__name__}"}
                assert reply.__name__ in schemas
            else:
                assert "_batch" in cid  # the built-ins and the example declare every reply
                assert answers["messages"]["reply"]["payload"]["$ref"].startswith("#/components/schemas/BatchReply_")
            assert _deref(doc, answers["messages"]["error"])["payload"] == {"$ref": "#/components/schemas/ErrorReply"}
            operation = doc["operations"][cid]
            assert operation["action"] == "receive" and "reply" in operation
            internal = {"name": "internal"} in operation["tags"]
            assert internal == (".cmd." in cid and cid.rsplit(".", 1)[1] not in public), cid


@pytest.mark.parametrize("extra", DEPLOYMENTS.values(), ids=DEPLOYMENTS.keys())
def test_every_event_type_of_every_context_is_in_its_events_channel(extra: dict[str, Any]) -> None:
    settings = _settings(**extra)
    doc = _doc(**extra)
    for bc in declared(settings).contexts:
        codec = EventCodec.of(bc.spec(settings).event_type)
        channel = doc["channels"][f"{bc.name}.events"]
        messages = [_deref(doc, m) for m in channel["messages"].values()]
        assert sorted(m["name"] for m in messages) == sorted(codec.current), bc.name
        for message in messages:
            assert message["headers"] == {"$ref": "#/components/schemas/EventHeaders"}
        assert doc["operations"][f"{bc.name}.events"]["action"] == "send"


def test_the_schemas_are_msgspecs_and_a_request_may_leave_out_its_tag() -> None:
    doc = _doc()
    schemas = doc["components"]["schemas"]
    _, generated = msgspec.json.schema_components([PlaceOrder, OrderAccepted], ref_template="#/components/schemas/{name}")
    place = schemas["PlaceOrder"]
    assert place["properties"] == generated["PlaceOrder"]["properties"]
    assert generated["PlaceOrder"]["required"] == ["type", "customer_id", "currency", "lines"]
    assert place["required"] == ["customer_id", "currency", "lines"]  # the tag is optional in a request...
    body = json.loads((ROOT / "examples" / "payloads" / "place_order.json").read_text())
    assert "type" not in body
    msgspec.convert(body, PlaceOrder)  # ...as the actor decodes it
    _schema_validator(doc, {"$ref": "#/components/schemas/PlaceOrder"}).validate(body)
    with pytest.raises(jsonschema.ValidationError):
        _schema_validator(doc, {"$ref": "#/components/schemas/PlaceOrder"}).validate({**body, "currency": "euro"})
    # A reply always carries it.
    assert schemas["OrderAccepted"] == generated["OrderAccepted"] and "type" in schemas["OrderAccepted"]["required"]


def test_an_error_reply_is_told_from_a_success_by_its_headers() -> None:
    doc = _doc()
    error = doc["components"]["messages"]["ErrorReply"]
    errors = _schema_validator(doc, _deref(doc, error["headers"]))
    success = _schema_validator(doc, _deref(doc, doc["channels"]["orders.cmd.place.reply"]["messages"]["reply"]["headers"]))
    body, headers = error_reply(NotFoundError("no order o-1"))
    assert h.SERVICE_ERROR_CODE in headers
    errors.validate(headers)
    assert not success.is_valid(headers)
    success.validate({})
    assert not errors.is_valid({})
    _schema_validator(doc, error["payload"]).validate(json.loads(body))


def test_addresses_are_the_subjects_with_their_parameters_filled_in() -> None:
    for partitions in (1, 4):
        doc = _doc(partitions=partitions, namespace="ns")
        orders, tasks = Context("orders", "ns", partitions), Context("tasks", "ns", partitions)
        fill = {"partition": str(orders.partition_of("o-1")), "order_id": "o-1", "name": "paid"}
        assert doc["channels"]["orders.events"]["address"].format(**fill) == orders.events("o-1")
        assert doc["channels"]["orders.outbox"]["address"].format(**fill) == orders.part_of("o-1").outbox("paid")
        fill = {"partition": str(tasks.partition_of("t-1")), "priority": "high", "task_id": "t-1"}
        assert doc["channels"]["tasks.queue"]["address"].format(**fill) == tasks.part_of("t-1").queue("high")
        assert doc["channels"]["tasks.live.cancel"]["address"].format(**fill) == tasks.live("cancel", "t-1")
        for cid, channel in doc["channels"].items():
            named = re.findall(r"\{(\w+)\}", channel["address"] or "")
            assert sorted(named) == sorted(channel.get("parameters", {})), cid
        partition = doc["channels"]["orders.events"]["parameters"].get("partition")
        assert (partition["enum"] if partition else None) == ([str(p) for p in range(4)] if partitions == 4 else None)


def test_the_work_queue_and_live_signals_are_described() -> None:
    doc = _doc()
    queue = doc["channels"]["tasks.queue"]
    assert queue["messages"]["message"]["payload"] == {"$ref": "#/components/schemas/Dispatch"}
    assert queue["parameters"]["priority"]["enum"] == ["high", "normal", "low"]
    assert doc["channels"]["tasks.live.progress"]["messages"]["message"]["payload"] == {
        "$ref": "#/components/schemas/TaskProgressed"}
    assert "payload" not in doc["channels"]["tasks.live.ready"]["messages"]["message"]  # an empty body
    outbox = doc["channels"]["orders.outbox"]["parameters"]["name"]["enum"]
    assert sorted(outbox) == ["cancelled", "confirmed", "paid", "shipped"]


def test_a_query_declares_the_type_its_run_returns() -> None:
    settings = _settings(context_modules="examples.loyalty")
    queries = [(bc.name, name, q) for bc in declared(settings).contexts if bc.read_model
               for name, q in bc.read_model.queries.items()]
    assert len(queries) >= 8
    for context, name, query in queries:
        assert query.reply is typing.get_type_hints(query.run)["return"], (context, name)


def test_a_union_field_loses_msgspecs_discriminator_object() -> None:
    """AsyncAPI 3.0's `discriminator` is a property name, OpenAPI's (msgspec's) an object."""
    from infra.asyncapi import _drop_discriminators

    _, components = msgspec.json.schema_components([Holder], ref_template="#/components/schemas/{name}")
    doc = json.loads(msgspec.json.encode(build(_settings())))
    assert isinstance(components["Holder"]["properties"]["event"]["discriminator"], dict)
    assert not _validator().is_valid({**doc, "components": {**doc["components"], "schemas": components}})
    _drop_discriminators(components)
    assert "discriminator" not in components["Holder"]["properties"]["event"]
    assert _validator().is_valid({**doc, "components": {**doc["components"], "schemas": components}})
