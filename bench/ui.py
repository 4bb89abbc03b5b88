"""Section 7: the outbound-log page, timed at the client.

On the generated log (``loggen``, the log-search section's file), with ``tidegate serve``
started on it and its page on a free port:

- the page's JSON: the first ``/ui/api/logs`` page (no filter, 50 rows) and the charts'
  ``/ui/api/stats`` for the last hour and the last day of the log (``end`` = the log's
  newest row: a cached log ends when it was made). The first call after the engine
  started is reported on its own (cold), then ``calls`` more (p50/p99);
- in Debian's chromium (Playwright, ``executable_path``, never a downloaded browser):
  from ``page.goto`` of the logged-in page to its first rendered row, and of the charts
  view to its first bar.

Live: a fresh engine delivering to the bench sink, the page open in live mode, one event
per request at ``LIVE_RATE`` a second. A MutationObserver in the page notes the wall
clock (``Date.now()``) when each row is added to the table; the delay is measured from
the moment the sink's answer came back (the row's time, when the request was sent, plus
its response time), on the same machine's clock.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from bench.loggen import SAMPLES_FILE
from bench.pipeline import post_ingest
from bench.processes import Process, start_engine, start_sink
from bench.traffic import antavo_event, create_connection

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HAVE_CHROMIUM = CHROMIUM.exists()
PAGE_ADDRESS = re.compile(r"page on (http://[^/\s]+)/")
LIVE_RATE = 20.0  # events a second, one per ingest request
LIVE_TIMEOUT = 60.0

# Notes when each row reaches the table (the page adds rows with prepend/append).
OBSERVER = """
() => {
  window.__seen = [];
  new MutationObserver((records) => {
    const now = Date.now();
    for (const r of records) for (const n of r.addedNodes) {
      if (n.nodeType === 1 && n.classList.contains("entry")) {
        const time = n.querySelector("time").getAttribute("datetime");
        const rt = Number(n.querySelector("td.rt").textContent);
        window.__seen.push([n.dataset.id, now, time, rt]);
      }
    }
  }).observe(document.getElementById("rows"), { childList: true });
}
"""


@dataclass
class UiResult:
    rows: int
    api: dict[str, list[float]] = field(default_factory=dict)  # name -> [cold, warm...]
    browser: dict[str, list[float]] = field(default_factory=dict)
    live: list[float] = field(default_factory=list)  # seconds, answer -> rendered row
    live_logged: int = 0
    note: str = ""


def page_base(engine: Process) -> str:
    match = PAGE_ADDRESS.search(engine.log_path.read_text(errors="replace"))
    if match is None:
        raise RuntimeError("the engine printed no page address (no --ui-port?)")
    return match.group(1)


async def _login(http: aiohttp.ClientSession, base: str, token: str) -> None:
    async with http.post(f"{base}/ui/session", json={"token": token}) as r:
        if r.status != 200:
            raise RuntimeError(f"login to the page answered {r.status}: {await r.text()}")


async def _timed_get(http: aiohttp.ClientSession, url: str) -> float:
    t0 = time.perf_counter()
    async with http.get(url) as r:
        body = await r.read()
        if r.status != 200:
            raise RuntimeError(f"GET {url} answered {r.status}: {body[:300]!r}")
    return time.perf_counter() - t0


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


async def run_ui(data_dir: Path, workdir: Path, calls: int, live_rows: int) -> UiResult:
    samples = json.loads((data_dir / SAMPLES_FILE).read_text())
    result = UiResult(samples["rows"])
    end = _iso(samples["last_ms"] + 1)
    rng = random.Random(7)

    def ledger(order: str) -> Callable[[], str]:
        # A sampled customer per call, as the log search does: one customer's pages
        # would be cached after the first call.
        return lambda: f"/ui/api/customers/{rng.choice(samples['customers'])}/ledger?order={order}"

    endpoints: dict[str, Callable[[], str]] = {
        "logs": lambda: "/ui/api/logs?page_size=50",
        "stats?window=1h": lambda: f"/ui/api/stats?window=1h&end={end}",
        "stats?window=24h": lambda: f"/ui/api/stats?window=24h&end={end}",
        "customers/{id}/ledger (newest first)": ledger("newest"),
        "customers/{id}/ledger?order=oldest": ledger("oldest"),
    }
    with start_engine(data_dir, workdir / "engine.log") as engine:
        base, token = page_base(engine), engine.extra["token"]
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            await _login(http, base, token)
            for name, path in endpoints.items():  # each one's first call is cold
                result.api[name] = [await _timed_get(http, base + path())]
            for name, path in endpoints.items():
                for _ in range(calls):
                    result.api[name].append(await _timed_get(http, base + path()))
        if HAVE_CHROMIUM:
            result.browser = await _browser_first_paint(base, token, end, max(3, calls // 4))
        else:
            result.note = f"{CHROMIUM} is missing: no browser figures"
    if HAVE_CHROMIUM and live_rows:
        result.live, result.live_logged = await _live(workdir / "live", live_rows)
    return result


async def _browser_first_paint(
    base: str, token: str, end: str, loads: int
) -> dict[str, list[float]]:
    from playwright.async_api import async_playwright  # the test extra

    timings: dict[str, list[float]] = {"first row": [], "first bar": []}
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = await (await browser.new_context()).new_page()
            await page.goto(f"{base}/ui/")
            await page.fill("#token", token)
            await page.press("#token", "Enter")
            await page.wait_for_selector("#rows tr.entry")
            for _ in range(loads):
                t0 = time.perf_counter()
                await page.goto(f"{base}/ui/")
                await page.wait_for_selector("#rows tr.entry")
                timings["first row"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                # A query of its own makes it a full page load, not a change of view.
                await page.goto(
                    f"{base}/ui/?load={len(timings['first bar'])}#/charts?window=24h&end={end}"
                )
                await page.wait_for_selector("rect.bar")
                timings["first bar"].append(time.perf_counter() - t0)
        finally:
            await browser.close()
    return timings


async def _live(workdir: Path, rows: int) -> tuple[list[float], int]:
    from playwright.async_api import async_playwright  # the test extra

    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    with (
        start_sink(workdir / "sink.log") as sink,
        start_engine(data_dir, workdir / "engine.log") as engine,
    ):
        token = engine.extra["token"]
        await create_connection(engine.extra["grpc"], sink.extra["url"], token=token)
        base = page_base(engine)
        async with async_playwright() as p:
            browser = await p.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
            )
            try:
                page = await (await browser.new_context()).new_page()
                await page.goto(f"{base}/ui/")
                await page.fill("#token", token)
                await page.press("#token", "Enter")
                await page.wait_for_selector("#logs:not([hidden])")
                await page.click("#live")
                # (wait_for_function evaluates a string: the page's CSP refuses that)
                await page.locator("#live-state", has_text="live").wait_for()
                await page.evaluate(OBSERVER)
                async with aiohttp.ClientSession() as http:
                    started = time.monotonic()
                    for n in range(rows):
                        due = started + n / LIVE_RATE
                        await asyncio.sleep(max(0.0, due - time.monotonic()))
                        body = json.dumps(antavo_event(n, f"ui-live-{n}")).encode()
                        await post_ingest(http, engine.extra["ingest"], body)
                # The engine may put several customers' events in one request: wait
                # until the page shows every request the log holds.
                deadline = time.monotonic() + LIVE_TIMEOUT
                seen: list[list[Any]] = []
                logged = previous = 0
                while time.monotonic() < deadline:
                    await asyncio.sleep(1.0)
                    previous, logged = logged, await _logged(base, token)
                    seen = await page.evaluate("window.__seen")
                    if logged and logged == previous and len(seen) >= logged:
                        break
            finally:
                await browser.close()
    delays = []
    for _id, shown_ms, iso, response_time in seen:
        sent = datetime.fromisoformat(iso.replace("Z", "+00:00"))
        answered = sent + timedelta(seconds=response_time)
        delays.append(shown_ms / 1000 - answered.timestamp())
    return delays, logged


async def _logged(base: str, token: str) -> int:
    """Requests in the log of the live run (a small log: one page holds them)."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        await _login(http, base, token)
        async with http.get(f"{base}/ui/api/logs?page_size=1000") as r:
            return len((await r.json())["logs"])
