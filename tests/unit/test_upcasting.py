"""Versioned events: the codec brings stored versions to the current shape through a chain of
upcasters, refuses what it cannot, and leaves current events as they are."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest

from actors.orders.messages import ORDER_EVENTS, OrderPlaced, OrderShipped
from actors.upcasting import EventCodec, EventVersionError


class Base(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    id: str


class Renamed(Base, frozen=True, kw_only=True, tag="thing.renamed"):
    """v1: `name`; v2: `title`; v3: `title` and `subtitle`."""

    v: int = 3
    title: str
    subtitle: str = ""


class Other(Base, frozen=True, kw_only=True, tag="thing.other"):
    v: int = 1


def _v1(e: dict[str, Any]) -> dict[str, Any]:
    e["title"] = e.pop("name")
    return e


def _v2(e: dict[str, Any]) -> dict[str, Any]:
    title, _, subtitle = e["title"].partition(": ")
    return {**e, "title": title, "subtitle": subtitle}


CODEC: EventCodec[Renamed | Other] = EventCodec(Renamed | Other, {("thing.renamed", 1): _v1, ("thing.renamed", 2): _v2})


def test_a_chain_of_upcasters_brings_any_stored_version_to_the_current_one() -> None:
    want = Renamed(id="a", title="Dune", subtitle="Messiah")
    assert CODEC.decode(b'{"type":"thing.renamed","v":1,"id":"a","name":"Dune: Messiah"}') == want
    assert CODEC.decode(b'{"type":"thing.renamed","v":2,"id":"a","title":"Dune: Messiah"}') == want
    assert CODEC.decode(msgspec.json.encode(want)) == want
    assert CODEC.decode(b'{"type":"thing.other","v":1,"id":"b"}') == Other(id="b")


def test_current_bytes_are_the_stored_ones_unless_the_event_was_upcast() -> None:
    current = msgspec.json.encode(Renamed(id="a", title="t"))
    assert CODEC.current_bytes(current) is current
    old = b'{"type":"thing.renamed","v":1,"id":"a","name":"x: y"}'
    assert msgspec.json.decode(CODEC.current_bytes(old)) == {"type": "thing.renamed", "v": 3, "id": "a", "title": "x",
                                                             "subtitle": "y"}


@pytest.mark.parametrize(("data", "complaint"), [
    (b'{"type":"thing.renamed","v":4,"id":"a","title":"t"}', "schema version 4 is newer than this code knows (3)"),
    (b'{"type":"thing.other","v":2,"id":"a"}', "schema version 2 is newer than this code knows (1)"),
    (b'{"type":"thing.renamed","v":0,"id":"a","name":"t"}', "not a positive integer"),
])
def test_what_cannot_be_brought_to_the_current_shape_is_a_decode_error(data: bytes, complaint: str) -> None:
    with pytest.raises(EventVersionError, match=re.escape(complaint)):
        CODEC.decode(data)
    with pytest.raises(msgspec.DecodeError):  # what readers park
        CODEC.decode(data)


def test_an_event_the_current_schema_refuses_that_is_not_older_keeps_the_schemas_complaint() -> None:
    with pytest.raises(msgspec.ValidationError, match="missing required field `title`"):
        CODEC.decode(b'{"type":"thing.renamed","v":3,"id":"a"}')
    with pytest.raises(msgspec.ValidationError, match="Invalid value 'thing.unknown'"):
        CODEC.decode(b'{"type":"thing.unknown","v":1,"id":"a"}')


def test_a_broken_chain_or_a_stray_upcaster_is_refused_when_the_codec_is_built() -> None:
    with pytest.raises(ValueError, match="upcasts from 1 but not from \\[2\\]"):
        EventCodec(Renamed | Other, {("thing.renamed", 1): _v1})
    with pytest.raises(ValueError, match="from version 3: the current one is 3"):
        EventCodec(Renamed | Other, {("thing.renamed", 3): _v1, ("thing.renamed", 1): _v1, ("thing.renamed", 2): _v2})
    with pytest.raises(ValueError, match="not one of these events"):
        EventCodec(Renamed | Other, {("thing.gone", 1): _v1})


def test_events_need_a_schema_version_and_must_store_it() -> None:
    class Bare(msgspec.Struct, tag="bare", tag_field="type"):
        id: str

    class Omitting(msgspec.Struct, tag="omitting", tag_field="type", omit_defaults=True):
        v: int = 1

    with pytest.raises(TypeError, match="needs a schema version"):
        EventCodec(Bare)
    with pytest.raises(TypeError, match="no omit_defaults"):
        EventCodec(Omitting)


def test_order_shipped_version_1_reads_as_version_2() -> None:
    """The shipped evolution: one `tracking` number became a list (an order in several parcels)."""
    v1 = b'{"type":"order.shipped","v":1,"order_id":"o-1","carrier":"ups","tracking":"1Z9","skus":["apple"]}'
    assert ORDER_EVENTS.decode(v1) == OrderShipped(order_id="o-1", carrier="ups", tracking_numbers=["1Z9"],
                                                   skus=["apple"])
    none = b'{"type":"order.shipped","v":1,"order_id":"o-1","carrier":null,"tracking":null,"skus":[]}'
    assert ORDER_EVENTS.decode(none).tracking_numbers == []  # type: ignore[union-attr]
    placed = OrderPlaced(order_id="o-1", customer_id="c", currency="EUR", lines=[])
    assert ORDER_EVENTS.decode(msgspec.json.encode(placed)) == placed
    assert ORDER_EVENTS.current == {**ORDER_EVENTS.current, "order.shipped": 2}
