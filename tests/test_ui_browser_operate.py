"""The page's operator views in a real browser (Debian's chromium driven by Playwright, as
in test_ui_browser.py) against a real engine delivering to the Insider sandbox: a
connection paused by a 401 shows its reason and is resumed; dead letters from a 400 are
listed, filtered, expanded, counted by a dry run and queued again after a confirmation.

Each view is kept as a screenshot under ``$TIDEGATE_SCREENSHOTS`` (default: the test's
tmp_path/screenshots); ``TIDEGATE_SCREENSHOTS=docs/screenshots`` remakes the README's."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Browser, Page, expect

from clients.client import TidegateClient
from engine.app import Engine, EngineConfig
from engine.queue.dead_letters import DeadLetterQuery
from engine.state import tokens
from engine.state.connections import STATE_ACTIVE
from plugins.insider.sandbox import RunningSandbox
from plugins.insider.sandbox.server import Fault
from tests.conftest import insider_connection, post_events
from tests.test_ui_browser import browser, page, screenshot, shots
from tests.test_ui_operate import (
    CONNECTION,
    dead_letters,
    drained,
    make_dead_letters,
    pause_with_401,
    points,
)
from tests.ui_support import base, make_token

__all__ = ["browser", "page", "shots"]  # fixtures shared with test_ui_browser.py


@pytest.fixture
def engine_config(engine_config: EngineConfig) -> EngineConfig:
    engine_config.ui_port = 0
    return engine_config


async def log_in(page: Page, engine: Engine, token: str, hash: str = "") -> None:
    await page.goto(f"{base(engine)}/ui/{hash}")
    await page.fill("#token", token)
    await page.press("#token", "Enter")
    await expect(page.locator("#views")).to_be_visible()


async def test_a_connection_paused_by_a_401_shows_its_reason_and_is_resumed(
    engine: Engine,
    client: TidegateClient,
    sandbox: RunningSandbox,
    browser: Browser,
    page: Page,
    shots: Path,
) -> None:
    await insider_connection(client, sandbox)
    async with aiohttp.ClientSession() as http:
        assert (await post_events(http, engine, points("ada", 1)))[0] == 202
    await drained(engine)
    await make_dead_letters(engine, sandbox, ["bo"])
    await pause_with_401(engine, sandbox, "cy")
    await engine.logs.flush()

    await log_in(page, engine, await make_token(engine, tokens.Role.OPERATOR, "ops"))
    await expect(page.locator("#logs")).to_be_visible()  # the log is the first view
    await page.click("#views a[data-view=connections]")
    await expect(page.locator("#connections")).to_be_visible()
    assert await page.locator("#logs").is_hidden()
    assert page.url.endswith("#/connections")
    row = page.locator("#conn-rows tr").filter(has_text=CONNECTION)
    await expect(row.locator("td.state")).to_contain_text("paused")
    await expect(row.locator("td.state .reason")).to_contain_text(
        "Insider refused the credentials (HTTP 401)"
    )
    await expect(row.locator("td.depth")).to_have_text("1")  # cy's item waits
    await expect(row.locator("td.recent.error")).to_contain_text("401")
    await expect(row.locator("td.recent").first).not_to_contain_text("none")
    await expect(row.locator("td.dead")).to_have_text("1")
    await screenshot(page, shots, "connections")

    # A viewer sees the same table without the Resume button; a link opens the view.
    viewer_context = await browser.new_context()
    viewer = await viewer_context.new_page()
    try:
        token = await make_token(engine, tokens.Role.VIEWER, "watcher")
        await log_in(viewer, engine, token, "#/connections")
        await expect(viewer.locator("#conn-rows td.state")).to_contain_text("paused")
        await expect(viewer.locator("#conn-rows button.resume")).to_have_count(0)
    finally:
        await viewer_context.close()

    # Resume with the keyboard: the probe goes through and the backlog drains.
    await row.locator("button.resume").focus()
    await page.keyboard.press("Enter")
    await expect(page.locator("#conn-status")).to_contain_text(f"{CONNECTION} resumed")
    await expect(row.locator("td.state")).to_have_text("active")
    assert engine.registry.view(CONNECTION).state == STATE_ACTIVE
    await drained(engine)
    await page.click("#conn-refresh")
    await expect(row.locator("td.depth")).to_have_text("0")

    # Logging out hides the view and its data.
    await page.click("#logout")
    await expect(page.locator("#login")).to_be_visible()
    assert await page.locator("#connections").is_hidden()
    assert await page.locator("#views").is_hidden()
    status = await page.evaluate("fetch('/ui/api/connections').then(r => r.status)")
    assert status == 401


async def test_a_dead_letter_is_listed_expanded_counted_and_replayed(
    engine: Engine,
    client: TidegateClient,
    sandbox: RunningSandbox,
    page: Page,
    shots: Path,
) -> None:
    await insider_connection(client, sandbox)
    await make_dead_letters(engine, sandbox, ["ana", "bo", "cy"])

    await log_in(page, engine, await make_token(engine, tokens.Role.OPERATOR, "ops"))
    await page.click("#views a[data-view=dead-letters]")
    rows = page.locator("#dl-rows tr.entry")
    await expect(rows).to_have_count(3)
    await expect(rows.locator("td.customer")).to_have_text(["ana", "bo", "cy"])
    await expect(rows.first.locator("td.error")).to_contain_text("400")

    # Filter by customer: the URL holds it.
    await page.fill("#dl-filters input[name=customer]", "bo")
    await page.press("#dl-filters input[name=customer]", "Enter")
    await expect(rows).to_have_count(1)
    assert "#/dead-letters?customer=bo" in page.url

    # A failure-time range, typed in local time and kept in UTC in the address.
    await page.fill("#dl-filters input[name=start]", "2099-01-01T00:00")
    await page.press("#dl-filters input[name=start]", "Enter")
    await expect(page.locator("#dl-empty")).to_be_visible()
    assert "start=2099-01-0" in page.url or "start=2098-12-31" in page.url
    await page.fill("#dl-filters input[name=start]", "2000-01-01T00:00")
    await page.press("#dl-filters input[name=start]", "Enter")
    await expect(rows).to_have_count(1)
    await page.fill("#dl-filters input[name=start]", "")
    await page.press("#dl-filters input[name=customer]", "Enter")
    assert "start=" not in page.url

    # Expand (keyboard): the stored record and the fragment rendered for Insider.
    await rows.first.focus()
    await page.keyboard.press("Enter")
    detail = page.locator("#dl-rows tr.detail")
    await expect(detail.locator("pre").first).to_contain_text('"id": "ev-bo-2"')
    await expect(detail.locator("pre").nth(1)).to_contain_text('"uuid": "bo"')
    request_link = detail.locator("dd a")  # the log view, searching for the last attempt
    assert (await request_link.get_attribute("href") or "").startswith("/ui/?identifier=")
    await screenshot(page, shots, "dead-letters")

    # Replay this one: a dry-run count, a confirmation, then the result.
    await detail.locator("button.replay-one").click()
    await expect(page.locator("#dl-confirm-text")).to_have_text(
        "1 dead letter will be queued again."
    )
    await expect(page.locator("#dl-confirm-yes")).to_be_focused()
    assert len(await engine.queue.dead_letters(DeadLetterQuery(), 100)) == 3  # not yet
    await page.keyboard.press("Enter")
    await expect(page.locator("#dl-result")).to_have_text("1 dead letter queued again.")
    await expect(page.locator("#dl-empty")).to_be_visible()
    await drained(engine)
    assert any(u.identifiers.get("uuid") == "bo" for u in sandbox.state.users)

    # The filtered set: counted, cancelled (nothing moves), then confirmed.
    await page.click("#dl-reset")
    await expect(rows).to_have_count(2)
    await page.select_option("#dl-filters select[name=stage]", "send")
    await page.click("#dl-filters button[type=submit]")
    assert "stage=send" in page.url
    await page.click("#dl-replay-all")
    await expect(page.locator("#dl-confirm-text")).to_have_text(
        "2 dead letters will be queued again."
    )
    await page.keyboard.press("Escape")
    await expect(page.locator("#dl-result")).to_have_text("Nothing was queued.")
    assert len(await engine.queue.dead_letters(DeadLetterQuery(), 100)) == 2
    await page.click("#dl-replay-all")
    await page.click("#dl-confirm-yes")
    await expect(page.locator("#dl-result")).to_have_text("2 dead letters queued again.")
    await expect(rows).to_have_count(0)
    await drained(engine)
    assert await engine.queue.dead_letters(DeadLetterQuery(), 100) == []

    # Back to the log: a link between views works both ways.
    await page.go_back()
    await page.go_back()
    await expect(page.locator("#dl-filters input[name=customer]")).to_have_value("bo")
    await page.go_back()  # the address before it: the range from 2000 on, in local time
    await expect(page.locator("#dl-filters input[name=start]")).to_have_value("2000-01-01T00:00")
    await page.click("#views a[data-view=logs]")
    await expect(page.locator("#logs")).to_be_visible()


async def test_the_operator_views_fit_a_phone(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, browser: Browser
) -> None:
    await insider_connection(client, sandbox)
    await make_dead_letters(engine, sandbox, ["phone-customer"])
    context = await browser.new_context(viewport={"width": 375, "height": 700})
    page = await context.new_page()
    try:
        token = await make_token(engine, tokens.Role.OPERATOR, "phone-ops")
        await log_in(page, engine, token, "#/dead-letters")
        await expect(page.locator("#dl-rows tr.entry")).to_have_count(1)
        await page.locator("#dl-rows tr.entry").click()
        await expect(page.locator("#dl-rows tr.detail")).to_be_visible()
        assert await page.evaluate("document.documentElement.scrollWidth") <= 375
        # The headers hidden on a phone are those of the hidden cells: they stay aligned.
        shown = await page.evaluate(
            "[...document.querySelectorAll('#dl-table th')]"
            ".filter(th => getComputedStyle(th).display !== 'none').length"
        )
        cells = await page.evaluate(
            "[...document.querySelectorAll('#dl-rows tr.entry td')]"
            ".filter(td => getComputedStyle(td).display !== 'none').length"
        )
        assert shown == cells
        await page.click("#views a[data-view=connections]")
        await expect(page.locator("#conn-rows tr")).to_have_count(1)
        assert await page.evaluate("document.documentElement.scrollWidth") <= 375
    finally:
        await context.close()


async def test_a_hostile_dead_letter_is_shown_as_text(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, page: Page
) -> None:
    await insider_connection(client, sandbox)
    hostile = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    sandbox.state.faults.append(Fault(status=400, body={"error": hostile}))
    async with aiohttp.ClientSession() as http:
        assert (await post_events(http, engine, points("<b>mallory</b>", 1)))[0] == 202
    await dead_letters(engine, 1)
    dialogs: list[str] = []
    page.on("dialog", lambda d: dialogs.append(d.message))
    token = await make_token(engine, tokens.Role.VIEWER, "hostile-viewer")
    await log_in(page, engine, token, "#/dead-letters")
    row = page.locator("#dl-rows tr.entry")
    await expect(row.locator("td.error")).to_contain_text(hostile)
    await expect(row.locator("td.customer")).to_have_text("<b>mallory</b>")
    await row.click()
    await expect(page.locator("#dl-rows tr.detail pre").first).to_contain_text("<b>mallory</b>")
    await expect(page.locator("#dl-rows tr.detail button.replay-one")).to_have_count(0)  # viewer
    assert await page.evaluate("window.pwned") is None
    assert await page.locator("#dl-rows img, #dl-rows script, #dl-rows b").count() == 0
    assert dialogs == []


async def test_dead_letters_page_with_load_more(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, page: Page
) -> None:
    await insider_connection(client, sandbox)
    sandbox.state.faults.append(Fault(status=400, remaining=100, body={"error": "bad"}))
    events = [points(f"c{n:02d}", n) for n in range(1, 53)]  # 52: a page of 50, then 2
    async with aiohttp.ClientSession() as http:
        assert (await post_events(http, engine, {"events": events}))[0] == 202
    await dead_letters(engine, 52)
    await log_in(page, engine, await make_token(engine, tokens.Role.VIEWER, "pager"))
    await page.click("#views a[data-view=dead-letters]")
    rows = page.locator("#dl-rows tr.entry")
    await expect(rows).to_have_count(50)
    await expect(page.locator("#dl-replay-all")).to_be_hidden()  # a viewer's page
    await page.click("#dl-more")
    await expect(rows).to_have_count(52)
    await expect(rows.last.locator("td.customer")).to_have_text("c52")
    await expect(page.locator("#dl-more")).to_be_hidden()
