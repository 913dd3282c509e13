"""The orders context's HTTP routes and their OpenAPI paths."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from actors.orders.messages import AddItem, CancelOrder, OrderAccepted, OrderPage, OrderView, PayOrder, PlaceOrder, ShipOrder
from http_edge import kit
from http_edge.openapi import MIN_SEQ, errors, history_paths, json_body, path_param, write

ORDERS = "orders"
TRANSITIONS = ("confirm", "pay", "ship", "cancel")


def routes(router: web.UrlDispatcher) -> None:
    router.add_post("/orders", kit.create(ORDERS, "place", "/orders", "order_id"))
    router.add_get("/orders", kit.listing(ORDERS, filters=("status", "customer_id", "cursor")))
    router.add_get("/orders/{order_id}", kit.get_one(ORDERS, "order_id"))
    router.add_post("/orders/{order_id}/items", kit.change(ORDERS, "add_item", "order_id"))
    router.add_delete("/orders/{order_id}/items/{sku}", kit.change(ORDERS, "remove_item", "order_id", ("sku",)))
    for name in TRANSITIONS:
        router.add_post(f"/orders/{{order_id}}/{name}", kit.change(ORDERS, name, "order_id"))
    kit.history_routes(router, ORDERS, "/orders/{order_id}", "order_id", "order")


def openapi() -> tuple[dict[str, Any], list[type]]:
    oid = path_param("order_id")
    reply = OrderAccepted
    paths = {
        "/orders": {
            "post": write("Place an order", reply, PlaceOrder, ok=201),
            "get": {
                "summary": "List orders (newest first, keyset pagination)",
                "parameters": [
                    {"name": "status", "in": "query", "schema": {"type": "string"}},
                    {"name": "customer_id", "in": "query", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    MIN_SEQ,
                ],
                "responses": {"200": {"description": "a page", "content": json_body(OrderPage)}, **errors(422, 503, 504)},
            },
        },
        "/orders/{order_id}": {
            "get": {
                "summary": "One order from the read model",
                "parameters": [oid, MIN_SEQ],
                "responses": {"200": {"description": "the order", "content": json_body(OrderView)},
                              **errors(404, 422, 503, 504)},
            }
        },
        "/orders/{order_id}/items": {"post": write("Add an item", reply, AddItem, ident=oid)},
        "/orders/{order_id}/items/{sku}": {
            "delete": write("Remove an item", reply, None, ident=oid, more=[path_param("sku")]),
        },
        "/orders/{order_id}/confirm": {"post": write(
            "Confirm the order: its stock is reserved; the answer waits (bounded) for the reservation "
            "and says `reserved` or `rejected` (with the short SKUs)", reply, None, ident=oid)},
        "/orders/{order_id}/pay": {"post": write("Pay the total of a reserved order", reply, PayOrder, ident=oid)},
        "/orders/{order_id}/ship": {"post": write("Ship a paid order", reply, ShipOrder, ident=oid)},
        "/orders/{order_id}/cancel": {"post": write("Cancel an order that has not shipped", reply, CancelOrder, ident=oid)},
        **history_paths("/orders/{order_id}", "order", oid),
    }
    return paths, [PlaceOrder, AddItem, PayOrder, ShipOrder, CancelOrder, OrderAccepted, OrderView, OrderPage]
