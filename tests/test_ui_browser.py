"""The outbound-log page in a real browser: Debian's chromium (/usr/bin/chromium, which
``.ci/run`` installs with apt) driven by Playwright, never a downloaded browser, against a
real engine delivering to the Insider sandbox."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from clients.client import TidegateClient
from engine.app import Engine, EngineConfig
from engine.outbound_log.rows import LogQuery
from engine.state import tokens
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import eventually, insider_connection, post_events
from tests.ui_support import base, make_token, row, write

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
"""Without the background-networking flags Chromium's own connections are refused on a
closed network (docs: shared/design/dashboard-and-scaleout.md, 1.4)."""
HAVE_CHROMIUM = CHROMIUM.exists()


@pytest.fixture
def engine_config(engine_config: EngineConfig) -> EngineConfig:
    engine_config.ui_port = 0
    return engine_config


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM:
        message = "Debian's chromium is missing: apt-get install -y chromium (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    async with async_playwright() as p:
        launched = await p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context()
    opened = await context.new_page()
    yield opened
    await context.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where a test keeps its screenshots: ``$TIDEGATE_SCREENSHOTS`` (the README's are
    made with ``docs/screenshots``), else the test's tmp_path."""
    folder = Path(os.environ.get("TIDEGATE_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def screenshot(page: Page, shots: Path, name: str) -> None:
    """Keeps the whole page as ``name``.png in ``shots`` (a test artefact)."""
    await page.set_viewport_size({"width": 1280, "height": 800})
    path = shots / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000


def points(n: int, customer: str) -> dict[str, object]:
    return {"customer": customer, "action": "point_add", "data": {"points": n}, "id": f"ev-{n}"}


async def logged(client: TidegateClient, engine: Engine, count: int) -> None:
    async def rows_logged() -> bool:
        await engine.logs.flush()
        rows, _ = await engine.logs.page(LogQuery(), 100)
        return len(rows) >= count

    await eventually(rows_logged, within=20)


async def log_in(page: Page, engine: Engine, token: str) -> None:
    await page.goto(f"{base(engine)}/ui/")
    await page.fill("#token", token)
    await page.press("#token", "Enter")
    await expect(page.locator("#logs")).to_be_visible()


async def add_criterion(page: Page, text: str) -> None:
    await page.fill("#search", text)
    await page.press("#search", "Enter")


async def test_log_in_search_expand_go_live_pause_and_log_out(
    engine: Engine,
    client: TidegateClient,
    sandbox: RunningSandbox,
    page: Page,
) -> None:
    await insider_connection(client, sandbox)
    async with aiohttp.ClientSession() as http:
        for n, customer in [(1, "alice"), (2, "bob")]:  # one request each
            status, _ = await post_events(http, engine, points(n, customer))
            assert status == 202
            await logged(client, engine, n)
    now = datetime.now(UTC)
    await write(
        engine,
        row("alice", 400, "invalid email", at=now - timedelta(seconds=30)),
        row("bob", 503, "Service Unavailable", at=now - timedelta(seconds=20)),
        row(
            "alice",
            429,
            "Too Many Requests",
            at=now - timedelta(seconds=10),
            response_body='{"error":"slow down","retry":true}',
        ),  # fmt: skip
    )
    token = await make_token(engine, tokens.Role.VIEWER, "browser-viewer")

    # A wrong token is refused with a message; the right one opens the log, newest first.
    await page.goto(f"{base(engine)}/ui/")
    await expect(page.locator("#login")).to_be_visible()
    await page.fill("#token", "tg_not_a_token")
    await page.press("#token", "Enter")
    await expect(page.locator("#login-error")).to_contain_text("not valid")
    await page.fill("#token", token)
    await page.click("#login-form button")
    rows = page.locator("#rows tr.entry")
    await expect(rows).to_have_count(5)
    # Newest first: the two delivered just now, then the three written with earlier times.
    await expect(rows.locator("td:nth-child(3)")).to_have_text(["200", "200", "429", "503", "400"])
    await expect(page.locator("#who-name")).to_have_text("browser-viewer (viewer)")
    time_cell = rows.nth(2).locator("time")
    assert (await time_cell.get_attribute("title") or "").endswith("(UTC)")

    # Several criteria as chips; the URL holds them.
    await add_criterion(page, "customer:alice")
    await add_criterion(page, "4xx")
    await expect(page.locator("#chips .chip")).to_have_count(2)
    await expect(rows).to_have_count(2)
    assert [await rows.nth(i).locator("td").nth(2).inner_text() for i in range(2)] == [
        "429",
        "400",
    ]
    assert "customer_id=alice" in page.url and "status=4xx" in page.url
    await add_criterion(page, "error:MANY")
    await expect(rows).to_have_count(1)
    await add_criterion(page, "status:7xx")  # refused by the server, named
    await expect(page.locator("#list-error")).to_contain_text("status")

    # A link reproduces the search.
    linked = await page.context.new_page()
    await linked.goto(f"{base(engine)}/ui/?customer_id=alice&status=4xx")
    await expect(linked.locator("#rows tr.entry")).to_have_count(2)
    await linked.close()

    # The X resets every criterion.
    await page.click("#reset")
    await expect(page.locator("#chips .chip")).to_have_count(0)
    await expect(rows).to_have_count(5)

    # A row expands (keyboard) to its pretty-printed bodies and per-customer outcomes.
    await rows.nth(2).focus()
    await page.keyboard.press("Enter")
    detail = page.locator("#rows tr.detail")
    await expect(detail).to_contain_text("Mapping version")
    await expect(detail.locator("pre").nth(1)).to_have_text(
        '{\n  "error": "slow down",\n  "retry": true\n}'
    )
    await expect(detail.locator("table.outcomes")).to_contain_text("Too Many Requests")
    await page.keyboard.press("Enter")
    await expect(detail).to_have_count(0)

    # Live: a request delivered now appears on top; paused, new rows wait and are counted.
    await page.click("#live")
    await expect(page.locator("#live-state")).to_have_text("live")
    async with aiohttp.ClientSession() as http:
        await post_events(http, engine, points(3, "carol"))
        await expect(rows.nth(0).locator("td.customer")).to_contain_text("carol", timeout=10_000)
        await page.click("#pause")
        await write(engine, row("dave", 200), row("erin", 200))
        await expect(page.locator("#pause")).to_have_text("Resume (2 new)")
        await expect(page.locator("#rows")).not_to_contain_text("dave")
        await page.click("#pause")
        await expect(page.locator("#rows")).to_contain_text("dave")
        await expect(rows.nth(0).locator("td.customer")).to_contain_text("erin")
    await expect(rows).to_have_count(8)

    # Log out: the page asks for a token again and the session is gone.
    await page.click("#logout")
    await expect(page.locator("#login")).to_be_visible()
    status = await page.evaluate("fetch('/ui/api/logs').then(r => r.status)")
    assert status == 401


async def test_a_hostile_body_is_shown_as_text(engine: Engine, page: Page) -> None:
    hostile = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    await write(
        engine,
        row("mallory", 400, "<b>bold</b> error", response_body=hostile, name="<i>M</i>"),
    )
    dialogs: list[str] = []
    page.on("dialog", lambda d: dialogs.append(d.message))
    await log_in(page, engine, await make_token(engine, tokens.Role.VIEWER, "hostile-viewer"))
    first = page.locator("#rows tr.entry").first
    await expect(first.locator("td.error")).to_have_text("<b>bold</b> error")
    await expect(first.locator("td.customer .name")).to_have_text("<i>M</i>")
    await first.click()
    detail = page.locator("#rows tr.detail")
    await expect(detail.locator("pre").nth(1)).to_have_text(hostile)
    await asyncio.sleep(0.2)
    assert await page.evaluate("window.pwned") is None
    assert await page.locator("#rows img, #rows script, #rows b, #rows i").count() == 0
    assert dialogs == []


async def test_without_a_session_the_page_shows_no_data_and_csrf_is_refused(
    engine: Engine, page: Page
) -> None:
    await write(engine, row("secret-customer", 200))
    await page.goto(f"{base(engine)}/ui/")
    await expect(page.locator("#login")).to_be_visible()
    assert await page.locator("#logs").is_hidden()
    assert "secret-customer" not in await page.content()
    status = await page.evaluate("fetch('/ui/api/logs').then(r => r.status)")
    assert status == 401
    token = await make_token(engine, tokens.Role.VIEWER, "csrf-viewer")
    await log_in(page, engine, token)
    # The session cookie alone does not make a POST: the CSRF header is missing or wrong.
    for headers in ["{}", "{'X-CSRF-Token': 'guess'}"]:
        status = await page.evaluate(
            f"fetch('/ui/logout', {{method: 'POST', headers: {headers}}}).then(r => r.status)"
        )
        assert status == 403
    await page.reload()
    await expect(page.locator("#logs")).to_be_visible()  # still logged in
    # The cookie is not readable by the page's script.
    assert "tidegate_session" not in await page.evaluate("document.cookie")


async def test_the_page_fits_a_phone(engine: Engine, browser: Browser) -> None:
    await write(engine, row("phone-customer", 503, "Service Unavailable " * 5))
    context = await browser.new_context(viewport={"width": 375, "height": 700})
    page = await context.new_page()
    try:
        await log_in(page, engine, await make_token(engine, tokens.Role.VIEWER, "phone-viewer"))
        await expect(page.locator("#rows tr.entry")).to_have_count(1)
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, width
    finally:
        await context.close()
