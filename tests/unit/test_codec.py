"""Wire decoding: malformed JSON and bad fields become coded errors that name the field."""

from __future__ import annotations

import msgspec
import pytest

from actors.orders.messages import COMMANDS, OrderEvent, OrderPlaced, PlaceOrder
from bus.codec import Decoder
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
    }
    raw = msgspec.json.encode(OrderPlaced(order_id="o", customer_id="c", currency="EUR", lines=[]))
    assert raw.startswith(b'{"type":"order.placed","v":1')


def test_every_command_subject_has_a_decoder() -> None:
    assert set(COMMANDS) == {"place", "add_item", "remove_item", "confirm", "pay", "ship", "cancel", "fulfilment_failed"}
