"""Wire decoding: malformed JSON and bad fields become coded errors that name the field."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from actors.orders.messages import COMMANDS, OrderEvent, OrderPlaced, PlaceOrder
from bus.codec import MAX_DEPTH, Decoder, check_depth, decode_json
from bus.errors import MalformedError, ValidationError


def test_malformed_json_is_malformed() -> None:
    with pytest.raises(MalformedError):
        Decoder(PlaceOrder).decode(b"{not json")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"currency":"EUR"}', "customer_id"),
        (b'{"customer_id":"c","currency":"euro"}', "currency"),
        (b'{"customer_id":"c","currency":"EUR","lines":[{"sku":"a","quantity":"2","unit_price":1}]}', "lines[0].quantity"),
        (b'{"customer_id":"c","currency":"EUR","lines":[{"sku":"a","quantity":0,"unit_price":1}]}', "lines[0].quantity"),
        (b'{"customer_id":"c","currency":"EUR","lines":[{"sku":"a","quantity":1,"unit_price":-5}]}', "lines[0].unit_price"),
        (b'{"customer_id":"c","currency":"EUR","surprise":1}', "surprise"),
        (b'{"customer_id":"c d","currency":"EUR"}', "customer_id"),
        (b'{"customer_id":"c","currency":"EUR"}', "lines"),
        (b'{"customer_id":"c","currency":"EUR","lines":[]}', "lines"),
    ],
)
def test_bad_fields_are_validation_errors_naming_the_field(body: bytes, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        Decoder(PlaceOrder).decode(body)
    assert err.value.field == field


def test_stored_event_tags_are_pinned() -> None:
    # A rename of a class must never change stored history.
    tags = {t.__struct_config__.tag for t in OrderEvent.__args__}
    assert tags == {
        "order.placed", "order.item_added", "order.item_removed", "order.confirmed",
        "order.paid", "order.shipped", "order.cancelled", "order.fulfilment_failed",
        "order.reserved", "order.rejected",
    }
    raw = msgspec.json.encode(OrderPlaced(order_id="o", customer_id="c", currency="EUR", lines=[]))
    assert raw.startswith(b'{"type":"order.placed","v":1')


def test_every_command_subject_has_a_decoder() -> None:
    assert set(COMMANDS) == {"place", "add_item", "remove_item", "confirm", "pay", "ship", "cancel", "fulfilment_failed",
                             "record_reserved", "record_rejected"}


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 500, 5000])
def test_bodies_nested_deeper_than_the_limit_are_malformed(depth: int) -> None:
    # 5000 levels made msgspec raise RecursionError (a 500); 500 decoded and broke readers.
    body = b'{"customer_id":"c","currency":"EUR","lines":[],"x":' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(MalformedError, match="deeper than 32"):
        Decoder(dict[str, Any]).decode(body)
    with pytest.raises(MalformedError, match="deeper than 32"):
        decode_json(body)
    # A schema with no room for nesting refuses the first unexpected bracket, naming the field.
    with pytest.raises(ValidationError):
        Decoder(PlaceOrder).decode(body)


def test_nesting_up_to_the_limit_and_brackets_inside_strings_are_fine() -> None:
    nested = b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1)
    assert Decoder(Any).decode(b'{"a":' + nested + b"}") == {"a": msgspec.json.decode(nested)}
    text = '[{"\\"' * 100  # escaped quotes must not end the string early
    assert decode_json(msgspec.json.encode({"s": text, "t": "]" * 50 + "{" * 50})) == {"s": text, "t": "]" * 50 + "{" * 50}


def test_an_unterminated_string_runs_to_the_end_of_the_body() -> None:
    # brackets after an unclosed quote are inside a string; the decoder refuses the body later
    check_depth(b'["' + b'\\"' * 5000 + b"[" * 40)
    with pytest.raises(MalformedError):
        Decoder(list).decode(b'["' + b'\\"' * 5000 + b"[" * 40)


def test_a_type_that_bounds_its_nesting_skips_the_depth_scan_and_still_refuses_deep_bodies() -> None:
    from actors.tasks.messages import ClaimTask, CompleteTask
    from bus.codec import _bounded
    from bus.wire import CommandBatch

    assert _bounded(CommandBatch[ClaimTask]) and _bounded(PlaceOrder)
    # `Any` (a task's result), plain containers and recursion can nest at will: scanned.
    assert not _bounded(CommandBatch[CompleteTask]) and not _bounded(dict) and not _bounded(Any)
    deep = b'{"items": [{"task_id": ' + b"[" * 5000 + b"]" * 5000 + b', "attempt": 1}]}'
    with pytest.raises(ValidationError):  # refused at the first bracket, never descended
        Decoder(CommandBatch[ClaimTask]).decode(deep)
    with pytest.raises(MalformedError):
        Decoder(CommandBatch[CompleteTask]).decode(deep.replace(b'"task_id"', b'"result"'))
