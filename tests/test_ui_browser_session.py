"""The page in a real browser (Debian's chromium through Playwright) when its session
ends while live mode is on: the page stops streaming and asks to log in again, saying why,
instead of reconnecting for ever."""

from __future__ import annotations

import pytest
from playwright.async_api import Page, expect

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
