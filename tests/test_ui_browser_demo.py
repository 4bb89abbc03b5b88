"""What a newcomer does: run ``tidegate demo --keep-running``, open the page address it
prints, log in with the token file it names, and read Insider's answer to a failed request
for the customer it points to. Real processes and Debian's chromium through Playwright."""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.async_api import Page, expect

from tests.test_cli import BIN
from tests.test_ui_browser import browser, page  # noqa: F401 (fixtures)


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The demo's printed lines up to "Still serving" and the token in the file they name;
    then the demo is stopped with Ctrl-C."""
    process = subprocess.Popen(
        [str(BIN / "tidegate"), "demo", "--customers", "10", "--keep-running"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        preexec_fn=default_sigint,
    )
    assert process.stdout is not None
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Still serving"):
                break
        else:
            raise AssertionError("the demo ended before serving:\n" + "".join(lines))
        out = "".join(lines)
        token_file = re.search(r"Log in with the token in (\S+)\.$", out, re.MULTILINE)
        assert token_file, out
        yield out, Path(token_file.group(1)).read_text().strip()
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


async def test_a_newcomer_reads_insiders_error_for_a_failed_customer_on_the_page(
    demo: tuple[str, str],
    page: Page,  # noqa: F811
) -> None:
    out, token = demo
    pointed = re.search(r"On the page: (http://127\.0\.0\.1:\d+/ui/\?customer_id=\S+) ", out)
    assert pointed, out
    await page.goto(pointed.group(1))
    await page.fill("#token", token)
    await page.press("#token", "Enter")
    failed = page.locator("#rows tr.entry", has=page.locator("td.error:not(:empty)"))
    await expect(failed.first).to_be_visible()
    await failed.first.click()
    details = page.locator("#rows tr.detail")
    # The customer's outcome with Insider's message, and Insider's response body.
    await expect(details).to_contain_text("failed")
    await expect(details).to_contain_text("not a valid email address")
