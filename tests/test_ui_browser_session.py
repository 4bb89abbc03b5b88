"""The page's state in a real browser (Debian's chromium through Playwright): when its
session ends while live mode is on, the page stops streaming and asks to log in again,
saying why, instead of reconnecting for ever; an answer to an older search never lands in
a newer one."""

from __future__ import annotations

import asyncio

import pytest
from playwright.async_api import Page, Route, expect

from engine.app import Engine, EngineConfig
from engine.state import tokens
from tests.test_ui_browser import browser, log_in, page  # noqa: F401 (fixtures)
from tests.ui_support import make_token, row, write


@pytest.fixture
def engine_config(engine_config: EngineConfig) -> EngineConfig:
    engine_config.ui_port = 0
    return engine_config


async def test_a_revoked_token_ends_live_mode_and_shows_the_login(
    engine: Engine,
    page: Page,  # noqa: F811
) -> None:
    token = await make_token(engine, tokens.Role.VIEWER, "screen")
    await log_in(page, engine, token)
    await page.click("#live")
    await expect(page.locator("#live-state")).to_have_text("live")
    first = row("dot")
    await write(engine, first)
    await expect(page.locator("#rows")).to_contain_text("dot")
    await engine.db.write(lambda c: tokens.revoke_token(c, "screen"))
    await expect(page.locator("#login")).to_be_visible(timeout=10_000)
    await expect(page.locator("#login-error")).to_contain_text("log in again")
    await expect(page.locator("#logs")).to_be_hidden()


async def test_an_answer_to_an_older_search_does_not_land_in_a_newer_one(
    engine: Engine,
    page: Page,  # noqa: F811
) -> None:
    await write(engine, row("alice", 200), row("alice", 429, "Too Many Requests"), row("bob", 503))
    await log_in(page, engine, await make_token(engine, tokens.Role.VIEWER, "racer"))
    await expect(page.locator("#rows tr.entry")).to_have_count(3)
    slow_answered = asyncio.Event()

    async def slow(route: Route) -> None:
        query = route.request.url.partition("?")[2]
        if "customer_id=alice" in query and "status" not in query:
            await asyncio.sleep(1.0)  # the first search's answer comes last
            await route.continue_()
            slow_answered.set()
        else:
            await route.continue_()

    await page.route("**/ui/api/logs?*", slow)
    await page.fill("#search", "customer:alice")
    await page.press("#search", "Enter")
    await page.fill("#search", "4xx")
    await page.press("#search", "Enter")
    await asyncio.wait_for(slow_answered.wait(), 10)
    await page.wait_for_timeout(300)  # time for the late answer to be handled
    rows = page.locator("#rows tr.entry")
    await expect(rows).to_have_count(1)
    await expect(rows.locator("td:nth-child(3)")).to_have_text(["429"])


async def test_live_mode_gives_its_stream_back_on_another_view_and_resumes(
    engine: Engine,
    page: Page,  # noqa: F811
) -> None:
    await log_in(page, engine, await make_token(engine, tokens.Role.VIEWER, "switcher"))
    await page.click("#live")
    await expect(page.locator("#live-state")).to_have_text("live")
    assert engine.logs.subscribers == 1
    await page.click("#views a[data-view=charts]")
    await expect(page.locator("#charts")).to_be_visible()
    for _ in range(50):  # the server notices the closed stream at its next recheck
        if engine.logs.subscribers == 0:
            break
        await asyncio.sleep(0.1)
    assert engine.logs.subscribers == 0
    missed = row("gus")
    await write(engine, missed)  # logged while another view was shown
    await page.click("#views a[data-view=logs]")
    await expect(page.locator("#live-state")).to_have_text("live")
    await expect(page.locator("#rows")).to_contain_text("gus")
    assert engine.logs.subscribers == 1
