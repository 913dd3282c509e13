"""Given stock events → decide → expected events (or a coded error). No I/O."""

from __future__ import annotations

from functools import reduce

import msgspec
import pytest

from actors.errors import InsufficientStockError, RuleViolationError, ValidationError
from actors.inventory import domain
from actors.inventory.messages import (
    COMMANDS,
    AdjustStock,
    CommitStock,
    InventoryEvent,
    ReceiveStock,
    ReleaseStock,
    ReserveStock,
    StockAdjusted,
    StockCommitted,
    StockReceived,
    StockReleased,
    StockReserved,
)

SKU = "sku-1"
RECEIVED = StockReceived(sku=SKU, quantity=10)
RESERVED = StockReserved(sku=SKU, order_id="o1", quantity=4, counted=True)
UNCOUNTED = StockReserved(sku=SKU, order_id="o1", quantity=4, counted=False)


def given(*events: InventoryEvent) -> domain.Stock:
    return reduce(domain.evolve, events, domain.INITIAL)


def test_receive_emits_stock_received_and_tracks_the_sku() -> None:
    assert domain.decide(given(), ReceiveStock(sku=SKU, quantity=10)) == [RECEIVED]
    state = given(RECEIVED)
    assert state.tracked and state.on_hand == 10 and state.available == 10


def test_receive_adds_to_the_stock_on_hand() -> None:
    assert given(RECEIVED, StockReceived(sku=SKU, quantity=5)).on_hand == 15


def test_adjust_emits_stock_adjusted_with_its_reason() -> None:
    cmd = AdjustStock(sku=SKU, delta=-3, reason="breakage")
    assert domain.decide(given(RECEIVED), cmd) == [StockAdjusted(sku=SKU, delta=-3, reason="breakage")]
    assert given(RECEIVED, StockAdjusted(sku=SKU, delta=-3, reason="breakage")).on_hand == 7


def test_adjust_tracks_an_untracked_sku() -> None:
    assert given(StockAdjusted(sku=SKU, delta=2, reason="found")).tracked


def test_adjust_by_zero_is_refused_naming_delta() -> None:
    with pytest.raises(ValidationError) as err:
        domain.decide(given(RECEIVED), AdjustStock(sku=SKU, delta=0, reason="nothing"))
    assert err.value.field == "delta"


def test_adjust_below_zero_on_hand_is_refused() -> None:
    with pytest.raises(RuleViolationError, match="would leave -1 on hand"):
        domain.decide(given(RECEIVED), AdjustStock(sku=SKU, delta=-11, reason="count"))


def test_adjust_below_the_reserved_stock_is_refused_naming_the_numbers() -> None:
    with pytest.raises(RuleViolationError, match="leave 3 on hand, below the 4 reserved"):
        domain.decide(given(RECEIVED, RESERVED), AdjustStock(sku=SKU, delta=-7, reason="count"))


def test_adjust_down_to_exactly_the_reserved_stock_is_allowed() -> None:
    [event] = domain.decide(given(RECEIVED, RESERVED), AdjustStock(sku=SKU, delta=-6, reason="count"))
    assert given(RECEIVED, RESERVED, event).available == 0


def test_reserve_of_tracked_stock_counts_against_what_is_available() -> None:
    assert domain.decide(given(RECEIVED), ReserveStock(sku=SKU, order_id="o1", quantity=4)) == [RESERVED]
    state = given(RECEIVED, RESERVED)
    assert (state.on_hand, state.reserved, state.available) == (10, 4, 6)


def test_reserve_of_all_that_is_available_is_allowed() -> None:
    [event] = domain.decide(given(RECEIVED, RESERVED), ReserveStock(sku=SKU, order_id="o2", quantity=6))
    assert isinstance(event, StockReserved) and event.counted


def test_reserve_beyond_what_is_available_is_refused_naming_the_numbers() -> None:
    with pytest.raises(InsufficientStockError) as err:
        domain.decide(given(RECEIVED, RESERVED), ReserveStock(sku=SKU, order_id="o2", quantity=7))
    assert err.value.field == "quantity"
    assert err.value.code == "insufficient_stock"
    assert err.value.message == f"sku {SKU}: 7 requested, 6 available"


def test_reserve_of_a_tracked_sku_with_nothing_on_hand_is_refused() -> None:
    with pytest.raises(InsufficientStockError):
        domain.decide(given(StockAdjusted(sku=SKU, delta=1, reason="x"), StockAdjusted(sku=SKU, delta=-1, reason="x")),
                      ReserveStock(sku=SKU, order_id="o1", quantity=1))


def test_reserve_of_an_untracked_sku_is_recorded_but_counts_against_nothing() -> None:
    assert domain.decide(given(), ReserveStock(sku=SKU, order_id="o1", quantity=4)) == [UNCOUNTED]
    state = given(UNCOUNTED)
    assert not state.tracked and state.reserved == 0 and "o1" in state.reservations


def test_reserve_again_for_the_same_order_emits_nothing() -> None:
    assert domain.decide(given(RECEIVED, RESERVED), ReserveStock(sku=SKU, order_id="o1", quantity=4)) == []
    assert domain.decide(given(UNCOUNTED), ReserveStock(sku=SKU, order_id="o1", quantity=9_999)) == []


def test_release_gives_the_reservation_back() -> None:
    released = StockReleased(sku=SKU, order_id="o1", quantity=4, counted=True)
    assert domain.decide(given(RECEIVED, RESERVED), ReleaseStock(sku=SKU, order_id="o1")) == [released]
    state = given(RECEIVED, RESERVED, released)
    assert state.available == 10 and not state.reservations


def test_release_without_a_reservation_emits_nothing() -> None:
    assert domain.decide(given(RECEIVED), ReleaseStock(sku=SKU, order_id="o1")) == []


def test_release_twice_emits_nothing_the_second_time() -> None:
    released = StockReleased(sku=SKU, order_id="o1", quantity=4, counted=True)
    assert domain.decide(given(RECEIVED, RESERVED, released), ReleaseStock(sku=SKU, order_id="o1")) == []


def test_commit_takes_counted_stock_off_hand() -> None:
    committed = StockCommitted(sku=SKU, order_id="o1", quantity=4, counted=True)
    assert domain.decide(given(RECEIVED, RESERVED), CommitStock(sku=SKU, order_id="o1")) == [committed]
    state = given(RECEIVED, RESERVED, committed)
    assert (state.on_hand, state.reserved, state.available) == (6, 0, 6)
    assert not state.reservations


def test_commit_of_an_uncounted_reservation_leaves_the_stock_on_hand() -> None:
    committed = StockCommitted(sku=SKU, order_id="o1", quantity=4, counted=False)
    # Stock received after the reservation does not make it count.
    assert domain.decide(given(UNCOUNTED, RECEIVED), CommitStock(sku=SKU, order_id="o1")) == [committed]
    assert given(UNCOUNTED, RECEIVED, committed).on_hand == 10


def test_commit_without_a_reservation_emits_nothing() -> None:
    assert domain.decide(given(RECEIVED), CommitStock(sku=SKU, order_id="o1")) == []


def test_commit_after_release_emits_nothing() -> None:
    released = StockReleased(sku=SKU, order_id="o1", quantity=4, counted=True)
    assert domain.decide(given(RECEIVED, RESERVED, released), CommitStock(sku=SKU, order_id="o1")) == []


def test_evolve_does_not_change_the_state_it_was_given() -> None:
    before = given(RECEIVED, RESERVED)
    domain.evolve(before, StockCommitted(sku=SKU, order_id="o1", quantity=4, counted=True))
    assert before.reservations == {"o1": domain.Reservation(quantity=4, counted=True)} and before.on_hand == 10


def test_a_sku_with_a_dot_is_refused_on_the_wire() -> None:
    # The SKU is a subject token (inventory.events.<sku>).
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"sku": "a.b", "quantity": 1}', type=COMMANDS["receive"])


def test_an_adjust_without_a_reason_is_refused_on_the_wire() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"sku": "a", "delta": 1}', type=COMMANDS["adjust"])
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"sku": "a", "delta": 1, "reason": ""}', type=COMMANDS["adjust"])


def test_stored_events_keep_their_pinned_tags_and_schema_version() -> None:
    raw = msgspec.json.encode(RESERVED)
    assert msgspec.json.decode(raw) == {"type": "inventory.stock_reserved", "v": 1, "sku": SKU, "order_id": "o1",
                                        "quantity": 4, "counted": True}
    assert msgspec.json.decode(raw, type=InventoryEvent) == RESERVED
