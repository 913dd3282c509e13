"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright for Python
(pointed at the system's Chromium: no browser download). A task submitted shows up as a running
row whose progress moves; a dead letter is retried from the page; the page is saved as a
screenshot (`.artifacts/dashboard.png`, or `$JETSOURCE_ARTIFACTS/dashboard.png`).

Skipped, saying why, where Chromium or Playwright is missing — except where
`JETSOURCE_REQUIRE_BROWSER=1` (`.ci/run` sets it once it has installed Chromium from Debian's
packages): there a missing browser fails the test."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, System, eventually
from tests.integration.test_orders_http import PLACE, post
from tests.integration.test_tasks import submit, wait_status

pytestmark = pytest.mark.single_stream

XSS = '<img src=x onerror="window.__xss = 1"><script>window.__xss = 2</script>'
CHROMIUM = os.environ.get("JETSOURCE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# As the machine's own check starts it: without the background-networking flags Chromium keeps
# trying (and failing) to reach Google's hosts from a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


# `.ci/run` sets this once it has Chromium: there, a missing browser or Playwright is a failure,
# not a skip (a CI run that skipped the browser test would say nothing about the page).
REQUIRED = os.environ.get("JETSOURCE_REQUIRE_BROWSER") == "1"


def _missing(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason}, and JETSOURCE_REQUIRE_BROWSER=1 says this run must have it")
    pytest.skip(reason)


def _playwright() -> Any:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _missing("Playwright for Python is not installed (pip install playwright; no browser download needed)")
    if CHROMIUM is None:
        _missing("no Chromium on this machine (Debian: apt-get install chromium); the browser test needs one")
    return async_playwright


def artifacts() -> Path:
    folder = Path(os.environ.get("JETSOURCE_ARTIFACTS") or ROOT / ".artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def test_the_dashboard_shows_a_task_moving_and_retries_a_dead_letter(system: System) -> None:
    async_playwright = _playwright()
    await system.start_worker()
    for _ in range(3):  # something to show in the recent orders
        assert (await post(system, "/orders", PLACE))[0] == 201
    # A dead letter the page will retry: it fails its one attempt, and succeeds when retried.
    dead = await submit(system, {"type": "flaky", "payload": {"fail_times": 1}, "retry": {"max_attempts": 1}})
    await wait_status(system, dead["task_id"], "dead")
    # A dead letter left for the screenshot, as one looks in real life.
    stays = await submit(system, {"type": "fail", "payload": {"error": "carrier API answered 503"},
                                  "retry": {"max_attempts": 1}})
    await wait_status(system, stays["task_id"], "dead")

    with tempfile.TemporaryDirectory(prefix="jetsource-chromium-") as profile:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1400, "height": 1500})
            traffic: asyncio.Task[None] | None = None
            try:
                page = browser.pages[0] if browser.pages else await browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
                await page.goto(system.base + "/dashboard")
                await page.wait_for_selector("#feed.up", timeout=15_000)
                traffic = asyncio.get_running_loop().create_task(_traffic(system))  # for the charts

                # A task that takes ~4 s and reports its progress 20 times.
                task = await submit(system, {"type": "sleep", "payload": {"seconds": 4}})
                row = page.locator(f'#running tr[data-task-id="{task["task_id"]}"]')
                await row.wait_for(timeout=15_000)
                first = await _progress(row)
                await eventually(lambda: _progress(row), lambda now: now > first, timeout=15,
                                 failure="the task's progress never moved on the page")

                # The dead letter, retried from its row.
                dead_row = page.locator(f'#dead tr[data-task-id="{dead["task_id"]}"]')
                await dead_row.wait_for(timeout=15_000)
                await dead_row.locator("button.retry").click()
                await page.wait_for_function(
                    "id => document.getElementById('notice').textContent.startsWith(id + ': ') && "
                    "!document.getElementById('notice').textContent.includes('retrying')",
                    arg=dead["task_id"], timeout=15_000)
                notice = await page.locator("#notice").text_content() or ""
                view = await wait_status(system, dead["task_id"], "completed")  # attempt 2 succeeds
                assert view["attempt"] == 2, (notice, view)
                await dead_row.wait_for(state="detached", timeout=15_000)

                # A recent order opens its history.
                order_link = page.locator("#recent-orders a.link").first
                await order_link.click()
                await page.locator("#history-events li strong").first.wait_for(timeout=10_000)
                assert await page.locator("#history-events li strong").first.text_content() == "order.placed"

                await page.wait_for_selector("#services tbody tr[data-service]", timeout=10_000)
                # A task running while the screenshot is taken, its progress bar part-way.
                shown = await submit(system, {"type": "sleep", "payload": {"seconds": 6}})
                shown_row = page.locator(f'#running tr[data-task-id="{shown["task_id"]}"]')
                await shown_row.wait_for(timeout=15_000)
                await eventually(lambda: _progress(shown_row), lambda now: now >= 20, timeout=15,
                                 failure="the screenshot's task never got going")
                await page.screenshot(path=str(artifacts() / "dashboard.png"), full_page=True)

                # A dead letter whose error is markup: shown as text, never run.
                hostile = await submit(system, {"type": "fail", "payload": {"error": XSS}, "retry": {"max_attempts": 1}})
                await wait_status(system, hostile["task_id"], "dead")
                hostile_row = page.locator(f'#dead tr[data-task-id="{hostile["task_id"]}"]')
                await hostile_row.wait_for(timeout=15_000)
                assert XSS in (await hostile_row.locator("td.error").text_content() or "")
                assert await page.locator("#dead img").count() == 0
                assert await page.evaluate("window.__xss === undefined")
                assert errors == [], errors
            finally:
                if traffic is not None:
                    traffic.cancel()
                    await asyncio.gather(traffic, return_exceptions=True)
                await browser.close()


async def _traffic(system: System) -> None:
    """Orders and tasks at a modest pace, so the rates have something to show."""
    while True:
        await post(system, "/orders", PLACE)
        await submit(system, {"type": "echo", "payload": {"hello": "dashboard"}})
        await asyncio.sleep(0.05)


async def _progress(row: Any) -> float:
    text = await row.locator("td").nth(3).text_content() or ""
    digits = "".join(ch for ch in text.split("%")[0] if ch.isdigit() or ch == ".")
    return float(digits or 0)
