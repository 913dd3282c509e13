"""An example bounded context outside jetsource: loyalty points per customer.

Load it with `JETSOURCE_CONTEXT_MODULES=examples.loyalty jetsource up` (or an entry point in the
`jetsource.contexts` group): it gets its own stream (LOYALTY), actor (`loyalty.cmd.earn`,
`loyalty.cmd.redeem`, NATS identity `loyalty_actor`), read model (table `loyalty_balances`,
`loyalty.query.get`) and routes (`POST /loyalty/{customer_id}/earn|redeem`,
`GET /loyalty/{customer_id}`, `GET /loyalty/{customer_id}/events`), all from `CONTEXT` below.
README.md, "Write your own context", walks through it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import asyncpg
import msgspec
from aiohttp import web

from actors.errors import NotFoundError, RuleViolationError
from actors.runtime import AggregateSpec
from bus.eventstore import StoredEvent
from bus.subjects import Context
from http_edge import kit
from infra.contexts import BoundedContext, Contract, Query, ReadModel
from projections.runner import event_time

CustomerId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
Points = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]


# ---- messages: commands, events, replies, queries (tags are stored forever) ------------------


class Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every loyalty request."""


class EarnPoints(Message, frozen=True, kw_only=True, tag="loyalty.earn"):
    """loyalty.cmd.earn: credit points to a customer."""

    customer_id: CustomerId
    points: Points
    reason: Annotated[str, msgspec.Meta(max_length=200)] = ""


class RedeemPoints(Message, frozen=True, kw_only=True, tag="loyalty.redeem"):
    """loyalty.cmd.redeem: spend points; never more than the balance."""

    customer_id: CustomerId
    points: Points


LoyaltyCommand = EarnPoints | RedeemPoints


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    v: int = 1
    customer_id: str


class PointsEarned(Event, frozen=True, kw_only=True, tag="loyalty.points_earned"):
    points: int
    reason: str = ""


class PointsRedeemed(Event, frozen=True, kw_only=True, tag="loyalty.points_redeemed"):
    points: int


LoyaltyEvent = PointsEarned | PointsRedeemed


class LoyaltyAccepted(msgspec.Struct, frozen=True, kw_only=True):
    customer_id: str
    balance: int
    version: int
    seq: int


class GetBalance(Message, frozen=True, kw_only=True, tag="loyalty.get"):
    customer_id: CustomerId
    min_seq: Annotated[int, msgspec.Meta(ge=0)] | None = None


class BalanceView(msgspec.Struct, frozen=True, kw_only=True):
    customer_id: str
    balance: int
    version: int
    updated_at: str


# ---- the decider: pure ----------------------------------------------------------------------


class Balance(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    points: int = 0


def decide(state: Balance, command: LoyaltyCommand) -> list[LoyaltyEvent]:
    if isinstance(command, EarnPoints):
        return [PointsEarned(customer_id=command.customer_id, points=command.points, reason=command.reason)]
    if command.points > state.points:
        raise RuleViolationError(f"cannot redeem {command.points} points: the balance is {state.points}")
    return [PointsRedeemed(customer_id=command.customer_id, points=command.points)]


def evolve(state: Balance, event: LoyaltyEvent) -> Balance:
    delta = event.points if isinstance(event, PointsEarned) else -event.points
    return Balance(points=state.points + delta)


def reply(customer_id: str, state: Balance, version: int) -> LoyaltyAccepted:
    """The answer to a command (its return type is the reply schema of the AsyncAPI document)."""
    return LoyaltyAccepted(customer_id=customer_id, balance=state.points, version=version, seq=version)


def spec(ctx: Context) -> AggregateSpec[Balance, LoyaltyCommand, LoyaltyEvent]:
    return AggregateSpec(
        ctx=ctx, initial=Balance(), evolve=evolve, decide=decide, event_type=LoyaltyEvent,
        commands={"earn": EarnPoints, "redeem": RedeemPoints},
        aggregate_id=lambda c: c.customer_id, with_id=lambda c, _id: c,
        reply=reply,
        event_id=lambda e: e.customer_id,
    )


# ---- the read model -------------------------------------------------------------------------

DDL = """
CREATE TABLE IF NOT EXISTS loyalty_balances (
    customer_id text PRIMARY KEY,
    balance     bigint NOT NULL,
    version     bigint NOT NULL,
    updated_at  timestamptz NOT NULL
);
"""


class BalancesProjection:
    """Folds a batch of loyalty events into `loyalty_balances` (one upsert per customer)."""

    name = "loyalty"

    def __init__(self) -> None:
        self._decoder = msgspec.json.Decoder(LoyaltyEvent)

    def decode(self, stored: StoredEvent) -> LoyaltyEvent:
        return self._decoder.decode(stored.data)

    @staticmethod
    def aggregate_id(event: LoyaltyEvent) -> str:
        return event.customer_id

    async def apply(self, conn: asyncpg.Connection, batch: list[tuple[StoredEvent, LoyaltyEvent]]) -> None:
        rows: dict[str, tuple[int, int, datetime]] = {}
        for stored, event in batch:
            balance = rows[event.customer_id][0] if event.customer_id in rows else None
            if balance is None:
                balance = await conn.fetchval("SELECT balance FROM loyalty_balances WHERE customer_id = $1",
                                              event.customer_id) or 0
            balance += event.points if isinstance(event, PointsEarned) else -event.points
            at = event_time(stored)
            rows[event.customer_id] = (balance, stored.seq, at)
        await conn.executemany(
            "INSERT INTO loyalty_balances VALUES ($1, $2, $3, $4) ON CONFLICT (customer_id) DO UPDATE "
            "SET balance = EXCLUDED.balance, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at",
            [(cid, *row) for cid, row in rows.items()])


async def get_balance(pool: asyncpg.Pool, query: GetBalance) -> BalanceView:
    row = await pool.fetchrow("SELECT * FROM loyalty_balances WHERE customer_id = $1", query.customer_id)
    if row is None:
        raise NotFoundError(f"customer {query.customer_id} has no points")
    return BalanceView(customer_id=row["customer_id"], balance=row["balance"], version=row["version"],
                       updated_at=row["updated_at"].astimezone(UTC).isoformat())


# ---- HTTP -----------------------------------------------------------------------------------


def routes(router: web.UrlDispatcher) -> None:
    router.add_post("/loyalty/{customer_id}/earn", kit.change("loyalty", "earn", "customer_id"))
    router.add_post("/loyalty/{customer_id}/redeem", kit.change("loyalty", "redeem", "customer_id"))
    router.add_get("/loyalty/{customer_id}", kit.get_one("loyalty", "customer_id"))
    kit.history_routes(router, "loyalty", "/loyalty/{customer_id}", "customer_id", "customer")


# ---- the declaration: everything above, registered once --------------------------------------

CONTEXT = BoundedContext(
    name="loyalty",
    aggregate=lambda ctx, settings: spec(ctx),
    public_commands=("earn", "redeem"),
    read_model=ReadModel(projection=BalancesProjection, tables=("loyalty_balances",), ddl=DDL,
                         queries={"get": Query(GetBalance, get_balance, aggregate="customer_id", reply=BalanceView)}),
    routes=routes,
    # What jetsource's behaviour suite sends it (tests/integration/test_contracts.py).
    contract=Contract(
        id_field="customer_id",
        create=lambda cid: ("earn", {"customer_id": cid, "points": 10}),
        change=lambda cid: ("earn", {"customer_id": cid, "points": 1}),
        refused=lambda cid: ("redeem", {"customer_id": cid, "points": 1_000_000}, "rule_violation"),
        invalid=("earn", {"customer_id": "c-1", "points": 0}, "points"),
    ),
)
