"""The dashboard's server side: the page and its assets from the package, the event stream of
snapshots taken from NATS (services, streams, projections, queues, tasks, parked, circuits), and
the edge's auth in front of all of it (bearer token or the session cookie; cookie writes need the
dashboard's header)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from bus import subjects as h
from bus.subjects import Parked
from infra.bootstrap import run_edge
from infra.embedded import free_port
from tests.conftest import System, eventually
from tests.integration.test_orders_http import PLACE, post
from tests.integration.test_tasks import submit, wait_status


async def _snapshots(http: aiohttp.ClientSession, url: str, count: int, **kwargs: Any) -> list[dict[str, Any]]:
    """The first `count` snapshots of the event stream."""
    out: list[dict[str, Any]] = []
    async with http.get(url, **kwargs) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        async for line in resp.content:
            if line.startswith(b"data: "):
                out.append(json.loads(line[6:]))
                if len(out) == count:
                    break
    return out


async def test_the_page_and_its_assets_are_served_from_the_package(system: System) -> None:
    async with system.http.get(system.base + "/dashboard") as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        html = await resp.text()
        assert "/dashboard/static/dashboard.js" in html
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]  # no inline script runs
    for name, kind in (("dashboard.js", "application/javascript"), ("dashboard.css", "text/css")):
        async with system.http.get(f"{system.base}/dashboard/static/{name}") as resp:
            assert (resp.status, resp.content_type) == (200, kind)
    async with system.http.get(system.base + "/dashboard/static/../app.py") as resp:
        assert resp.status == 404


async def test_the_event_stream_carries_what_the_system_reports(system: System) -> None:
    await system.start_worker()
    status, _, order = await post(system, "/orders", PLACE)
    assert status == 201
    dead = await submit(system, {"type": "fail", "payload": {"error": "boom"}, "retry": {"max_attempts": 1}})
    await wait_status(system, dead["task_id"], "dead")
    # An outbox event the saga cannot read: parked, and the dashboard shows it.
    await system.nc.jetstream().publish(system.orders.parts[0].outbox("confirmed"), b"\x00 not an event",
                                        headers={h.EV_COMMAND_ID: "poison-for-the-dashboard"})
    # And a message on the parked stream no reader parked (a stored reply aimed there): no entry.
    await system.nc.jetstream().publish(Parked(system.settings.namespace).wildcard[:-1] + "not-an-entry", b"{}")

    def complete(snap: dict[str, Any]) -> bool:
        projections = [p for s in snap["services"] for e in s["endpoints"]
                       for p in ((e.get("data") or {}).get("projection") or [])]
        return (bool(projections) and any(t["task_id"] == dead["task_id"] for t in snap["dead"]["items"])
                and snap["parked"].get("count") == 1)

    async def snapshot() -> dict[str, Any]:
        return (await _snapshots(system.http, system.base + "/dashboard/events", 1))[0]

    snap = await eventually(snapshot, complete, timeout=20, failure="the dashboard never showed the dead letter")
    names = {s["name"] for s in snap["services"]}
    assert {f"{system.ctx(c).service_name}_{kind}" for c in ("orders", "tasks") for kind in ("actor", "query")} <= names
    stores = [st for s in snap["services"] for e in s["endpoints"] for st in ((e.get("data") or {}).get("store") or [])]
    assert any(st["commands"] >= 1 and st["writes"] >= 1 for st in stores), stores  # group-commit counters
    streams = {st["stream"]: st for st in snap["streams"]}
    for context in ("orders", "tasks"):
        assert sum(st["last_seq"] for st in streams.values() if st["context"] == context) >= 1, streams
    assert {p["name"] for s in snap["services"] for e in s["endpoints"]
            for p in ((e.get("data") or {}).get("projection") or [])} == {p.name for p in system.projectors}
    assert snap["task_stats"]["by_status"]["dead"] >= 1
    assert any(o["order_id"] == order["order_id"] for o in snap["recent:orders"]["items"])
    assert {r["context"] for r in snap["recent"]} >= {"orders", "tasks"}
    [parked] = snap["parked"]["first"]
    assert snap["parked"]["by_reader"] == {parked["reader"]: 1} and parked["stream"] == system.orders.parts[0].stream
    assert any(c["subject"] == system.tasks.command("submit") and c["state"] == "closed" for c in snap["circuits"])
    assert "waiting_by_priority" in snap["task_stats"]


async def test_no_snapshot_is_taken_while_no_page_listens(system: System) -> None:
    from http_edge.dashboard import DASHBOARD

    settings = system.settings.model_copy(update={"http_port": free_port()})
    async with run_edge(settings, system.nc) as runner:
        dashboard = runner.app[DASHBOARD]
        await asyncio.sleep(1.5)
        assert dashboard.snapshots == 0
        await _snapshots(system.http, f"http://127.0.0.1:{settings.http_port}/dashboard/events", 2)
        taken = dashboard.snapshots
        assert taken >= 2
        await asyncio.sleep(2.5)  # the page went away: the snapshots stop
        assert dashboard.snapshots <= taken + 1


async def test_with_tokens_the_dashboard_needs_one_and_cookie_writes_need_its_header(system: System) -> None:
    settings = system.settings.model_copy(update={"http_port": free_port(), "api_tokens": "writer",
                                                  "api_read_tokens": "reader"})
    base = f"http://127.0.0.1:{settings.http_port}"
    async with run_edge(settings, system.nc):
        async with aiohttp.ClientSession() as anonymous:
            async with anonymous.get(base + "/dashboard", allow_redirects=False) as resp:
                assert (resp.status, resp.headers["Location"]) == (303, "/dashboard/login")
            async with anonymous.get(base + "/dashboard/login") as resp:
                assert resp.status == 200 and "token" in await resp.text()
            for path in ("/dashboard/events", "/dashboard/static/dashboard.js"):
                async with anonymous.get(base + path) as resp:
                    assert resp.status == 401, path
            async with anonymous.post(base + "/dashboard/session", data={"token": "wrong"}, allow_redirects=False) as resp:
                assert (resp.status, resp.headers["Location"]) == (303, "/dashboard/login")
                assert "jetsource_token" not in resp.cookies
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            async with browser.post(base + "/dashboard/session", data={"token": "writer"}, allow_redirects=False) as resp:
                assert (resp.status, resp.headers["Location"]) == (303, "/dashboard")
                cookie = resp.cookies["jetsource_token"]
                assert cookie["httponly"] and cookie["samesite"] == "Strict" and int(cookie["max-age"]) > 0
                assert "writer" not in cookie.value  # a MAC of the session, never the token itself
            async with browser.get(base + "/dashboard") as resp:
                assert resp.status == 200
            assert len(await _snapshots(browser, base + "/dashboard/events", 1)) == 1
            async with browser.post(base + "/orders", json=PLACE) as resp:
                assert resp.status == 401  # a cookie alone never writes: another site's form could send it
            async with browser.post(base + "/orders", json=PLACE, headers={"X-Jetsource-Dashboard": "1"}) as resp:
                assert resp.status == 201
        async with aiohttp.ClientSession() as forger:
            for value in ("writer", f"{int(time.time()) + 60}.{'0' * 64}", cookie.value.replace(".", "9.", 1),
                          f"{int(time.time()) - 1}.{cookie.value.split('.', 1)[1]}"):
                async with forger.get(base + "/dashboard/events", cookies={"jetsource_token": value}) as resp:
                    assert resp.status == 401, value  # the token as a cookie, a forged MAC, another expiry
        async with aiohttp.ClientSession() as client:
            async with client.post(base + "/dashboard/session", json={"tok": "writer"}) as resp:
                assert resp.status == 422 and (await resp.json())["error"]["field"] == "token"
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as auditor:
            async with auditor.post(base + "/dashboard/session", json={"token": "reader"}) as resp:
                assert resp.status == 200 and (await resp.json())["grant"] == "read"
            async with auditor.post(base + "/orders", json=PLACE, headers={"X-Jetsource-Dashboard": "1"}) as resp:
                assert resp.status == 403


async def test_a_section_whose_source_does_not_answer_says_so_and_the_rest_still_come(system: System) -> None:
    from bus.subjects import Context
    from http_edge.breaker import Breakers
    from http_edge.dashboard import Dashboard, DashboardConfig, Recent

    # A context nobody serves and no stream holds, beside the system's own orders.
    ghost = Context("ghost", system.settings.namespace)
    dashboard = Dashboard(system.nc, {"orders": system.orders, "ghost": ghost}, Breakers(),
                          DashboardConfig(recent=(Recent("ghost", "id", "/ghost"), Recent("orders", "order_id", "/orders")),
                                          tasks=None, parked=Parked(system.settings.namespace)))
    snap = await dashboard.snapshot()
    assert "error" in snap["recent:ghost"] and "items" in snap["recent:orders"]
    streams = {st["context"]: st for st in snap["streams"]}
    assert "error" in streams["ghost"] and "error" not in streams["orders"]
    assert snap["services"] and "error" not in snap["parked"]
