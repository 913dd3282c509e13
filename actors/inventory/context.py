"""The inventory context, declared once: the stock aggregate, its read model and routes."""

from __future__ import annotations

from actors.inventory.messages import GetStock, ListStock, StockPage, StockView
from actors.inventory.service import inventory_spec
from http_edge import inventory as routes
from infra.contexts import BoundedContext, Contract, Query, ReadModel
from projections import inventory as read_model

CONTEXT = BoundedContext(
    name="inventory",
    aggregate=lambda ctx, settings: inventory_spec(ctx),
    # Internal: reserve, release and commit, which the order saga sends.
    public_commands=("receive", "adjust"),
    read_model=ReadModel(
        projection=read_model.InventoryProjection, tables=read_model.TABLES, ddl=read_model.DDL,
        queries={"get": Query(GetStock, read_model.get_stock, aggregate="sku", reply=StockView),
                 "list": Query(ListStock, read_model.list_stock, reply=StockPage)},
    ),
    routes=routes.routes,
    openapi=routes.openapi,
    contract=Contract(
        id_field="sku",
        create=lambda sku: ("receive", {"sku": sku, "quantity": 5}),
        change=lambda sku: ("receive", {"sku": sku, "quantity": 1}),
        refused=lambda sku: ("adjust", {"sku": sku, "delta": -1000, "reason": "count"}, "rule_violation"),
        invalid=("receive", {"sku": "s-1", "quantity": 0}, "quantity"),
    ),
)
