"""The edge serves the NATS API's AsyncAPI document, and the running system answers as it says."""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from tests.conftest import System
from tests.integration.test_orders_http import PLACE


def _deref(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while set(node) == {"$ref"}:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _valid(doc: dict[str, Any], schema: dict[str, Any], value: Any) -> bool:
    """Whether a message's headers or payload match one of the document's schemas (msgspec's
    JSON Schema, refs into the document's components)."""
    return jsonschema.Draft202012Validator({**_deref(doc, schema), "components": doc["components"]}).is_valid(value)


async def test_asyncapi_json_describes_the_subjects_this_system_answers_on(system: System) -> None:
    async with system.http.get(system.base + "/asyncapi.json") as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        doc = await resp.json()
    assert doc["asyncapi"] == "3.0.0"
    place = doc["channels"]["orders.cmd.place"]
    assert place["address"] == system.orders.command("place")  # this deployment's namespace
    events = doc["channels"]["orders.events"]["address"]
    assert ("{partition}" in events) == (system.settings.partitions > 1)
    replies = doc["channels"]["orders.cmd.place.reply"]["messages"]
    reply, error = replies["reply"], _deref(doc, replies["error"])
    # A command sent where the document says is answered as it says...
    msg = await system.request(place["address"], PLACE)
    assert _valid(doc, reply["headers"], msg.headers or {}) and _valid(doc, reply["payload"], json.loads(msg.data))
    assert not _valid(doc, error["headers"], msg.headers or {})
    # ...and so is a refusal, which the headers tell from a success.
    msg = await system.request(place["address"], {**PLACE, "currency": "euro"})
    assert _valid(doc, error["headers"], msg.headers or {}) and _valid(doc, error["payload"], json.loads(msg.data))
    assert not _valid(doc, reply["headers"], msg.headers or {})
    # The OpenAPI lists it among the operational routes.
    async with system.http.get(system.base + "/openapi.json") as resp:
        assert "/asyncapi.json" in (await resp.json())["paths"]
