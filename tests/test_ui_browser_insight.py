"""The page's insight views in a real browser (Debian's chromium driven by Playwright, as
test_ui_browser.py): the tag chip, the customer view reached from a click on a customer,
the charts' bars for rows the test made, and JSON highlighting that keeps a hostile body
as text. Each view's screenshot is kept: in ``$TIDEGATE_SCREENSHOTS`` when set (the README's
docs/screenshots/ are made that way), else in the test's tmp_path."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Browser, Page, expect

from clients.client import TidegateClient
from engine.app import Engine, EngineConfig
from engine.outbound_log.rows import LogCustomer, new_request_id
from engine.state import tokens
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import insider_connection, post_events
from tests.test_ui_browser import (
    add_criterion,
    browser,
    log_in,
    logged,
    page,
    points,
    screenshot,
    shots,
)
from tests.ui_support import base, make_token, row, write

__all__ = ["browser", "page", "shots"]  # fixtures shared with test_ui_browser.py


@pytest.fixture
def engine_config(engine_config: EngineConfig) -> EngineConfig:
    engine_config.ui_port = 0
    return engine_config


async def test_the_tag_chip_narrows_the_log_and_the_url_holds_it(
    engine: Engine, page: Page, shots: Path
) -> None:
    now = datetime.now(UTC)
    await write(
        engine,
        replace(row("alice", 200, at=now - timedelta(seconds=30)), tags="backfill"),
        replace(row("bob", 200, at=now - timedelta(seconds=20)), tags="replay"),
        replace(row("carol", 400, "invalid email", at=now - timedelta(seconds=10)), tags="replay"),
        row("dave", 200, at=now - timedelta(seconds=5)),
    )
    await log_in(page, engine, await make_token(engine, tokens.Role.VIEWER, "tag-viewer"))
    rows = page.locator("#rows tr.entry")
    await expect(rows).to_have_count(4)
    await add_criterion(page, "tag:replay")
    await expect(page.locator("#chips .chip")).to_have_text(["tag: replay ×"])
    await expect(rows).to_have_count(2)
    await expect(rows.locator("td.customer .name + .cid")).to_have_text(["carol", "bob"])
    assert "tag=replay" in page.url
    await add_criterion(page, "tag:nope!")  # refused by the server, named
    await expect(page.locator("#list-error")).to_contain_text("tag")
    await page.goto(f"{base(engine)}/ui/?tag=backfill")
    await expect(rows).to_have_count(1)
    await expect(rows.first.locator("td.customer")).to_contain_text("alice")

    # The logs view for the README: the whole log with the error row opened.
    await page.goto(f"{base(engine)}/ui/")
    await expect(rows).to_have_count(4)
    await rows.nth(1).click()
    await expect(page.locator("#rows tr.detail pre.json").first).to_be_visible()
    await screenshot(page, shots, "logs")


async def test_a_click_on_a_customer_opens_everything_sent_for_them(
    engine: Engine,
    client: TidegateClient,
    sandbox: RunningSandbox,
    page: Page,
    shots: Path,
) -> None:
    await insider_connection(client, sandbox)
    async with aiohttp.ClientSession() as http:
        for n in (1, 2):  # delivered to the sandbox for real: one request each
            status, _ = await post_events(http, engine, points(n, "alice"))
            assert status == 202
            await logged(client, engine, n)
    failed_at = datetime.now(UTC) + timedelta(seconds=1)
    failed = replace(
        row("bob", 200, at=failed_at),
        id=new_request_id(failed_at),
        error="1 of 2 users failed",
        customers=(
            LogCustomer("bob", "Bob B", "delivered", ""),
            LogCustomer("alice", "Alice A", "failed", "invalid email address: 'alice@'"),
        ),
        customer_count=2,
        mapping_version=7,
        attempt=3,
    )
    await write(engine, failed, row("carol", 200))
    await log_in(page, engine, await make_token(engine, tokens.Role.VIEWER, "ledger-viewer"))
    await expect(page.locator("#rows tr.entry")).to_have_count(4)

    # The oldest row's customer cell links to alice's view.
    link = page.locator("#rows tr.entry").last.locator("a.cid")
    await expect(link).to_have_text("alice")
    await link.click()
    await expect(page.locator("#customer")).to_be_visible()
    assert await page.locator("#logs").is_hidden()
    await expect(page.locator("#customer-id")).to_have_text("alice")
    assert "#/customer?" in page.url and "id=alice" in page.url
    ledger = page.locator("#ledger tr")
    await expect(ledger).to_have_count(3)  # two delivered requests and the batch with bob
    first = ledger.first  # newest first: the failed batch
    await expect(first.locator("td.outcome")).to_have_text("failed")
    await expect(first.locator("td.error")).to_have_text("invalid email address: 'alice@'")
    await expect(first.locator("td").nth(5)).to_have_text("7")
    await expect(first.locator("td").nth(6)).to_have_text("3")
    await expect(ledger.locator("td.outcome")).to_have_text(["failed", "delivered", "delivered"])
    assert (await first.locator("time").get_attribute("title") or "").endswith("(UTC)")
    await screenshot(page, shots, "customer")

    # Oldest first, by URL; the request link opens that row in the log.
    await page.click("#order-oldest")
    await expect(ledger.locator("td.outcome")).to_have_text(["delivered", "delivered", "failed"])
    await ledger.last.locator("td.id a").click()
    await expect(page.locator("#logs")).to_be_visible()
    await expect(page.locator("#rows tr.entry")).to_have_count(1)
    await expect(page.locator("#rows tr.entry td.id")).to_have_text(failed.id)
    await expect(page.locator("#chips .chip")).to_have_count(1)


async def test_the_charts_draw_bars_for_the_rows_written(
    engine: Engine, page: Page, shots: Path
) -> None:
    now = datetime.now(UTC)
    statuses = {"insider-eu": [200] * 12 + [404] * 3 + [503] * 2, "insider-us": [200] * 5 + [0]}
    written = []
    for connection, codes in statuses.items():
        for i, code in enumerate(codes):
            at = now - timedelta(minutes=2 + (i * 7) % 50, seconds=i)
            error = "" if code == 200 else f"failed with {code}"
            written.append(
                replace(
                    row(f"c{i}", code, error, connection, at=at),
                    response_time=0.08 + 0.01 * i,
                )
            )
    await write(engine, *written)
    await log_in(page, engine, await make_token(engine, tokens.Role.VIEWER, "chart-viewer"))
    await page.click("#views a[data-view=charts]")
    await expect(page.locator("#charts")).to_be_visible()
    panels = page.locator(".chart-panel")
    await expect(panels).to_have_count(2)
    await expect(panels.locator("h3")).to_have_text(["insider-eu", "insider-us"])

    async def drawn(panel: int, kind: str) -> int:
        counts = (
            await panels.nth(panel)
            .locator(f"rect.bar[data-class='{kind}']")
            .evaluate_all("bars => bars.map(b => Number(b.dataset.count))")
        )
        return sum(counts)

    assert await drawn(0, "2xx") == 12
    assert await drawn(0, "4xx") == 3
    assert await drawn(0, "5xx") == 2
    assert await drawn(1, "network") == 1 and await drawn(1, "2xx") == 5
    await expect(panels.nth(0).locator(".fact.total dd")).to_have_text("17")
    await expect(panels.nth(0).locator(".fact.error-rate dd")).to_have_text("29.4%")  # 5/17
    await expect(panels.nth(1).locator(".fact.error-rate dd")).to_have_text("16.7%")  # 1/6
    # Bars stand in the bucket of their minute: 60 buckets, each bar inside the chart.
    heights = (
        await panels.nth(0)
        .locator("svg.bars rect.bar")
        .evaluate_all("bars => bars.map(b => Number(b.getAttribute('height')))")
    )
    assert heights and all(h > 0 for h in heights)
    await expect(panels.nth(0).locator("svg.lines polyline.p99")).to_have_count(1)
    await screenshot(page, shots, "charts")

    # The day's window, and one connection by its heading's link.
    await page.click("#window-24h")
    await expect(page.locator("#window-24h")).to_have_attribute("aria-current", "true")
    await panels.nth(1).locator("h3 a").click()
    await expect(panels).to_have_count(1)
    assert "connection=insider-us" in page.url and "window=24h" in page.url
    assert await drawn(0, "network") == 1


async def test_highlighting_shows_a_hostile_json_body_as_text(engine: Engine, page: Page) -> None:
    body = (
        '{"<img src=x onerror=\\"window.pwned=1\\">": "<script>window.pwned=2</script>",'
        ' "count": -12.5e3, "ok": true, "none": null}'
    )
    await write(engine, row("mallory", 400, "bad", response_body=body))
    dialogs: list[str] = []
    page.on("dialog", lambda d: dialogs.append(d.message))
    await log_in(page, engine, await make_token(engine, tokens.Role.VIEWER, "json-viewer"))
    await page.locator("#rows tr.entry").first.click()
    response = page.locator("#rows tr.detail pre.json").nth(1)
    await expect(response.locator(".j-key")).to_have_text(
        ['"<img src=x onerror=\\"window.pwned=1\\">"', '"count"', '"ok"', '"none"']
    )
    await expect(response.locator(".j-str")).to_have_text(['"<script>window.pwned=2</script>"'])
    await expect(response.locator(".j-num")).to_have_text(["-12500"])
    await expect(response.locator(".j-lit")).to_have_text(["true", "null"])
    # The text is exactly the pretty-printed JSON, nothing became markup.
    await expect(response).to_have_text(
        "{\n"
        '  "<img src=x onerror=\\"window.pwned=1\\">": "<script>window.pwned=2</script>",\n'
        '  "count": -12500,\n  "ok": true,\n  "none": null\n}'
    )
    await asyncio.sleep(0.2)
    assert await page.evaluate("window.pwned") is None
    assert await page.locator("#rows img, #rows script").count() == 0
    assert dialogs == []


async def test_the_insight_views_fit_a_phone_and_work_by_keyboard(
    engine: Engine, browser: Browser
) -> None:
    await write(
        engine,
        row("phone-customer", 503, "Service Unavailable " * 5, connection="insider-" + "x" * 40),
        row("phone-customer", 200),
    )
    context = await browser.new_context(viewport={"width": 375, "height": 700})
    page = await context.new_page()
    try:
        await log_in(page, engine, await make_token(engine, tokens.Role.VIEWER, "phone-viewer"))
        await expect(page.locator("#rows tr.entry")).to_have_count(2)
        # The row's details link each customer to their view, reached here by keyboard.
        await page.locator("#rows tr.entry").first.focus()
        await page.keyboard.press("Enter")
        outcome_link = page.locator("#rows tr.detail table.outcomes a")
        await expect(outcome_link).to_have_text("phone-customer")
        await outcome_link.focus()
        await page.keyboard.press("Enter")
        await expect(page.locator("#ledger tr")).to_have_count(2)
        assert await page.evaluate("document.documentElement.scrollWidth") <= 375
        await page.goto(f"{base(engine)}/ui/#/charts")
        await expect(page.locator(".chart-panel")).to_have_count(2)
        assert await page.evaluate("document.documentElement.scrollWidth") <= 375
    finally:
        await context.close()
