"""The orders context, declared once: the order aggregate, its read model and routes."""

from __future__ import annotations

from actors.orders.messages import GetOrder, ListOrders, OrderPage, OrderView
from actors.orders.service import order_spec
from http_edge import orders as routes
from infra.contexts import BoundedContext, Contract, Query, ReadModel
from projections import orders as read_model

CONTEXT = BoundedContext(
    name="orders",
    aggregate=lambda ctx, settings: order_spec(ctx, settle_wait_s=settings.saga_wait_s),
    # Internal: what the order saga and fulfilment report back.
    public_commands=("place", "add_item", "remove_item", "confirm", "pay", "ship", "cancel"),
    read_model=ReadModel(
        projection=read_model.OrdersProjection, tables=read_model.TABLES, ddl=read_model.DDL,
        queries={"get": Query(GetOrder, read_model.get_order, aggregate="order_id", reply=OrderView),
                 "list": Query(ListOrders, read_model.list_orders, reply=OrderPage)},
    ),
    routes=routes.routes,
    openapi=routes.openapi,
    contract=Contract(
        id_field="order_id",
        create=lambda oid: ("place", {"order_id": oid, "customer_id": "c-1", "currency": "EUR",
                                      "lines": [{"sku": "apple", "quantity": 1, "unit_price": 100}]}),
        change=lambda oid: ("add_item", {"order_id": oid, "sku": "pear", "quantity": 1, "unit_price": 50}),
        refused=lambda oid: ("pay", {"order_id": oid, "amount": 100}, "rule_violation"),
        invalid=("place", {"customer_id": "c-1", "currency": "euro", "lines": []}, "currency"),
    ),
)
