"""The orders context, declared once: the order aggregate, its read model and routes."""

from __future__ import annotations

from actors.orders.messages import GetOrder, ListOrders
from actors.orders.service import order_spec
from http_edge import orders as routes
from infra.contexts import BoundedContext, Query, ReadModel
from projections import orders as read_model

CONTEXT = BoundedContext(
    name="orders",
    aggregate=lambda ctx, settings: order_spec(ctx, settle_wait_s=settings.saga_wait_s),
    # Internal: what the order saga and fulfilment report back.
    public_commands=("place", "add_item", "remove_item", "confirm", "pay", "ship", "cancel"),
    read_model=ReadModel(
        projection=read_model.OrdersProjection, tables=read_model.TABLES, ddl=read_model.DDL,
        queries={"get": Query(GetOrder, read_model.get_order), "list": Query(ListOrders, read_model.list_orders)},
    ),
    routes=routes.routes,
    openapi=routes.openapi,
)
