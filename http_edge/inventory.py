"""The inventory context's HTTP routes and their OpenAPI paths."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from actors.inventory.messages import AdjustStock, InventoryAccepted, ReceiveStock, StockPage, StockView
from http_edge import kit
from http_edge.openapi import MIN_SEQ, errors, history_paths, json_body, path_param, write

INVENTORY = "inventory"


def routes(router: web.UrlDispatcher) -> None:
    router.add_get("/inventory", kit.listing(INVENTORY, filters=("cursor",)))
    router.add_get("/inventory/{sku}", kit.get_one(INVENTORY, "sku"))
    router.add_post("/inventory/{sku}/receive", kit.change(INVENTORY, "receive", "sku"))
    router.add_post("/inventory/{sku}/adjust", kit.change(INVENTORY, "adjust", "sku"))
    kit.history_routes(router, INVENTORY, "/inventory/{sku}", "sku", "sku")


def openapi() -> tuple[dict[str, Any], list[type]]:
    sku = path_param("sku")
    reply = InventoryAccepted
    paths = {
        "/inventory": {
            "get": {
                "summary": "List tracked SKUs (in SKU order, keyset pagination)",
                "parameters": [
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    MIN_SEQ,
                ],
                "responses": {"200": {"description": "a page", "content": json_body(StockPage)}, **errors(422, 503, 504)},
            },
        },
        "/inventory/{sku}": {
            "get": {
                "summary": "One tracked SKU's stock from the read model (404: untracked, always available)",
                "parameters": [sku, MIN_SEQ],
                "responses": {"200": {"description": "the stock", "content": json_body(StockView)},
                              **errors(404, 422, 503, 504)},
            }
        },
        "/inventory/{sku}/receive": {"post": write(
            "Receive stock: the SKU is tracked from now on", reply, ReceiveStock, ident=sku)},
        "/inventory/{sku}/adjust": {"post": write(
            "Adjust the stock on hand by a nonzero delta, with a reason; never below what is reserved",
            reply, AdjustStock, ident=sku)},
        **history_paths("/inventory/{sku}", "SKU", sku),
    }
    return paths, [ReceiveStock, AdjustStock, InventoryAccepted, StockView, StockPage]
