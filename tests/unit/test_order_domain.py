"""Given events → decide → expected events (or a coded error). No I/O."""

from __future__ import annotations

from functools import reduce

import pytest

from actors.errors import NotFoundError, PendingError, RuleViolationError, ValidationError
from actors.orders import domain
from actors.orders.messages import (
    AddItem,
    CancelOrder,
    ConfirmOrder,
    ItemAdded,
    ItemRemoved,
    OrderCancelled,
    OrderConfirmed,
    OrderEvent,
    OrderLine,
    OrderPaid,
    OrderPlaced,
    OrderRejected,
    OrderReserved,
    OrderShipped,
    PayOrder,
    PlaceOrder,
    RecordRejected,
    RecordReserved,
    RemoveItem,
    ShipOrder,
)

OID = "o1"
PLACED = OrderPlaced(order_id=OID, customer_id="c1", currency="EUR", lines=[OrderLine(sku="a", quantity=2, unit_price=100)])
LINE = OrderLine(sku="a", quantity=2, unit_price=100)
CONFIRMED = OrderConfirmed(order_id=OID, total=200, lines=[LINE])
RESERVED = OrderReserved(order_id=OID)
PAID = OrderPaid(order_id=OID, amount=200)
SHIPPED = OrderShipped(order_id=OID, skus=["a"])


def given(*events: OrderEvent) -> domain.Order:
    return reduce(domain.evolve, events, domain.INITIAL)


def test_place_emits_order_placed_with_the_lines() -> None:
    cmd = PlaceOrder(customer_id="c1", currency="EUR", lines=[OrderLine(sku="a", quantity=2, unit_price=100)], order_id=OID)
    assert domain.decide(given(), cmd) == [PLACED]


def test_place_twice_is_a_rule_violation() -> None:
    with pytest.raises(RuleViolationError):
        domain.decide(given(PLACED), PlaceOrder(customer_id="c1", currency="EUR", lines=PLACED.lines, order_id=OID))


def test_place_without_lines_is_refused_naming_lines() -> None:
    with pytest.raises(ValidationError) as err:
        domain.decide(given(), PlaceOrder(customer_id="c1", currency="EUR", lines=[], order_id=OID))
    assert err.value.field == "lines"


def test_place_with_a_repeated_sku_names_the_field() -> None:
    line = OrderLine(sku="a", quantity=1, unit_price=1)
    with pytest.raises(ValidationError) as err:
        domain.decide(given(), PlaceOrder(customer_id="c", currency="EUR", lines=[line, line], order_id=OID))
    assert err.value.field == "lines[1].sku"


def test_add_item_merges_quantity_of_the_same_sku() -> None:
    state = given(PLACED, ItemAdded(order_id=OID, sku="a", quantity=3, unit_price=100))
    assert state.lines["a"].quantity == 5
    assert state.total == 500


def test_add_item_at_another_price_for_the_same_sku_is_refused() -> None:
    with pytest.raises(RuleViolationError):
        domain.decide(given(PLACED), AddItem(order_id=OID, sku="a", quantity=1, unit_price=99))


def test_remove_item_that_is_not_on_the_order_is_refused() -> None:
    with pytest.raises(RuleViolationError):
        domain.decide(given(PLACED), RemoveItem(order_id=OID, sku="zzz"))


def test_remove_item_emits_item_removed_and_drops_the_total() -> None:
    events = domain.decide(given(PLACED), RemoveItem(order_id=OID, sku="a"))
    assert events == [ItemRemoved(order_id=OID, sku="a")]
    assert given(PLACED, *events).total == 0


def test_items_cannot_change_after_confirmation() -> None:
    with pytest.raises(RuleViolationError):
        domain.decide(given(PLACED, CONFIRMED), AddItem(order_id=OID, sku="b", quantity=1, unit_price=1))


def test_confirm_freezes_the_total() -> None:
    assert domain.decide(given(PLACED), ConfirmOrder(order_id=OID)) == [CONFIRMED]


def test_confirm_an_empty_order_is_refused() -> None:
    with pytest.raises(RuleViolationError):
        domain.decide(given(PLACED, ItemRemoved(order_id=OID, sku="a")), ConfirmOrder(order_id=OID))


def test_pay_must_equal_the_total() -> None:
    with pytest.raises(RuleViolationError, match="does not equal"):
        domain.decide(given(PLACED, CONFIRMED, RESERVED), PayOrder(order_id=OID, amount=199))
    assert domain.decide(given(PLACED, CONFIRMED, RESERVED), PayOrder(order_id=OID, amount=200)) == [PAID]


def test_a_confirmed_order_waits_for_its_reservation() -> None:
    state = given(PLACED, CONFIRMED)
    assert domain.pending(state)
    for cmd in (PayOrder(order_id=OID, amount=200), ShipOrder(order_id=OID)):
        with pytest.raises(PendingError):
            domain.decide(state, cmd)
    assert domain.decide(state, RecordReserved(order_id=OID)) == [RESERVED]
    assert not domain.pending(given(PLACED, CONFIRMED, RESERVED))


def test_a_rejected_order_names_the_short_skus_and_ends_there() -> None:
    events = domain.decide(given(PLACED, CONFIRMED), RecordRejected(order_id=OID, short_skus=["a"]))
    assert events == [OrderRejected(order_id=OID, short_skus=["a"])]
    state = given(PLACED, CONFIRMED, *events)
    assert state.status == "rejected" and state.short_skus == ("a",) and not domain.pending(state)
    for cmd in (PayOrder(order_id=OID, amount=200), CancelOrder(order_id=OID), RecordReserved(order_id=OID)):
        with pytest.raises(RuleViolationError):
            domain.decide(state, cmd)


def test_the_saga_answers_only_a_confirmed_order() -> None:
    for history in ([PLACED], [PLACED, CONFIRMED, RESERVED], [PLACED, OrderCancelled(order_id=OID)]):
        with pytest.raises(RuleViolationError):
            domain.decide(given(*history), RecordReserved(order_id=OID))


def test_pay_before_confirm_is_refused() -> None:
    with pytest.raises(RuleViolationError):
        domain.decide(given(PLACED), PayOrder(order_id=OID, amount=200))


def test_ship_only_when_paid() -> None:
    with pytest.raises(RuleViolationError):
        domain.decide(given(PLACED, CONFIRMED, RESERVED), ShipOrder(order_id=OID))
    assert domain.decide(given(PLACED, CONFIRMED, RESERVED, PAID), ShipOrder(order_id=OID)) == [SHIPPED]


def test_cancel_is_allowed_until_shipping_releases_what_is_held_and_owes_a_paid_order_its_money() -> None:
    assert domain.decide(given(PLACED), CancelOrder(order_id=OID)) == [OrderCancelled(order_id=OID)]
    held = OrderCancelled(order_id=OID, skus=["a"])
    histories: list[list[OrderEvent]] = [[PLACED, CONFIRMED], [PLACED, CONFIRMED, RESERVED]]
    for history in histories:
        assert domain.decide(given(*history), CancelOrder(order_id=OID)) == [held]
    paid = domain.decide(given(PLACED, CONFIRMED, RESERVED, PAID), CancelOrder(order_id=OID))
    assert paid == [OrderCancelled(order_id=OID, skus=["a"], refund_due=200)]
    assert given(PLACED, CONFIRMED, RESERVED, PAID, *paid).refund_due == 200


def test_cancel_after_shipping_or_twice_is_refused() -> None:
    with pytest.raises(RuleViolationError):
        domain.decide(given(PLACED, CONFIRMED, RESERVED, PAID, SHIPPED), CancelOrder(order_id=OID))
    with pytest.raises(RuleViolationError):
        domain.decide(given(PLACED, OrderCancelled(order_id=OID)), CancelOrder(order_id=OID))


def test_commands_on_an_unknown_order_are_not_found() -> None:
    for cmd in (ConfirmOrder(order_id=OID), CancelOrder(order_id=OID), AddItem(order_id=OID, sku="a", quantity=1, unit_price=1)):
        with pytest.raises(NotFoundError):
            domain.decide(given(), cmd)


def test_an_order_confirmed_before_the_saga_existed_can_be_paid() -> None:
    # Its OrderConfirmed has no lines and no outbox copy: nothing will ever reserve it.
    old = OrderConfirmed(order_id=OID, total=200)
    state = given(PLACED, old)
    assert state.status == "reserved" and not domain.pending(state)
    assert domain.decide(state, PayOrder(order_id=OID, amount=200)) == [PAID]
