"""The console in Debian's headless Chromium, driven by Playwright; screenshots for the docs.

Skips when Playwright or /usr/bin/chromium is missing, except under
`TIDINGS_REQUIRE_SERVICES=1` (CI), where that is a failure. Never downloads a browser.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.console.conftest import (
    CORRELATION,
    SCRIPT,
    TOKEN,
    Demo,
    Server,
    append_now,
    event,
    make_broker,
    serve,
)

CHROMIUM = "/usr/bin/chromium"
DOCS_SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
# `make screenshots` (TIDINGS_SCREENSHOTS=1) refreshes the README's pictures; a plain test run
# takes them too, into a temporary folder, so it never changes the checkout.
SHOTS = (
    DOCS_SHOTS
    if os.environ.get("TIDINGS_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "tidings-console-screenshots"
)
WAIT = 10_000  # ms: the longest any step waits


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install playwright; never `playwright install`)"
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        return f"Chromium is not installed at {CHROMIUM} (apt-get install -y chromium)"
    return None


problem = _missing()
if problem is not None:
    if os.environ.get("TIDINGS_REQUIRE_SERVICES") == "1":
        pytest.fail(problem + "; TIDINGS_REQUIRE_SERVICES=1 makes this a failure", pytrace=False)
    pytest.skip(problem, allow_module_level=True)

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402


@pytest.fixture(scope="module")
def server(demo: Demo) -> Iterator[Server]:
    running = serve(demo, broker=make_broker())
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium"),
            args=["--no-sandbox"] if os.geteuid() == 0 else [],
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    context = browser.new_context(
        viewport={"width": 1366, "height": 768}, base_url=server.url, color_scheme="light"
    )
    context.set_default_timeout(WAIT)
    opened = context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    opened.on(
        "console",
        lambda message: (
            problems.append(f"console {message.type}: {message.text}")
            if message.type == "error" and "403" not in message.text
            else None
        ),
    )
    outside: list[str] = []
    opened.on(
        "request",
        lambda request: (
            None if request.url.startswith((server.url, "data:")) else outside.append(request.url)
        ),
    )
    yield opened
    context.close()
    assert not outside, f"requests left the machine: {outside}"
    assert not problems, problems  # a CSP violation or a script error shows up here


def shot(page: Page, name: str, **options: Any) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), **options)


def test_open_the_console_and_a_stream_from_the_keyboard(page: Page) -> None:
    page.goto("/")
    expect(page.locator("h1")).to_have_text("Streams")
    shot(page, "streams")
    page.keyboard.press("/")
    expect(page.locator("#search")).to_be_focused()
    page.keyboard.type("order")
    page.keyboard.press("Enter")
    expect(page.locator("table.list a.rowlink")).to_have_count(1)
    page.keyboard.press("j")
    expect(page.locator("a.rowlink").first).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("h1")).to_have_text("order-42")
    expect(page.locator("article.event")).to_have_count(2)
    page.goto("/s/0/stream/payment-42")
    expect(page.locator("article.event .type").first).to_have_text("payment.requested")
    shot(page, "stream")


def test_the_live_log_receives_events_while_the_demo_appends(page: Page, demo: Demo) -> None:
    page.goto("/s/0/log")
    expect(page.locator("#live-status")).to_contain_text("live")

    def appends() -> None:
        for number in range(5):
            append_now(demo.url, "sensor-7", event("reading.taken", n=number, celsius=20 + number))
            time.sleep(0.15)

    writer = threading.Thread(target=appends)
    writer.start()
    try:
        rows = page.locator("#log-rows tr", has_text="reading.taken")
        expect(rows).to_have_count(5)
    finally:
        writer.join(timeout=WAIT / 1000)
    expect(page.locator("#live-status")).to_contain_text("5 new")
    expect(page.locator("#log-rows tr").first).to_contain_text('"n": 4')
    shot(page, "live-log")


def test_an_event_whose_data_holds_script_shows_as_text(page: Page, demo: Demo) -> None:
    page.goto("/s/0/stream/customer-evil")
    expect(page.locator("pre.data").first).to_contain_text(SCRIPT)
    assert page.evaluate("window.__pwned") is None
    assert page.locator("main img").count() == 0
    shot(page, "escaping")
    page.goto("/s/0/log")  # and through the live log too
    expect(page.locator("#live-status")).to_contain_text("live")
    append_now(demo.url, "customer-evil", event("customer.renamed", name=SCRIPT))
    expect(page.locator("#log-rows tr").first).to_contain_text("<script>window.__pwned")
    assert page.evaluate("window.__pwned") is None


def test_open_a_trace(page: Page) -> None:
    page.goto("/s/0/stream/payment-42")
    page.locator(f'a[href="/s/0/trace/{CORRELATION}"]').first.click()
    expect(page.locator("h1")).to_contain_text(CORRELATION)
    expect(page.locator("ol.timeline li")).to_have_count(5)
    expect(page.locator("ol.timeline li.depth-2")).to_have_count(2)
    shot(page, "trace")


def test_replay_a_dead_letter_with_the_token_refused_without(page: Page, server: Server) -> None:
    refused = page.request.post("/dead-letters/dl-4/replay", form={"x": "1"})
    assert refused.status == 403
    page.goto("/dead-letters")
    expect(page.locator("table.list tbody tr")).to_have_count(7)
    shot(page, "dead-letters")
    page.locator('a[href="/dead-letters/dl-4"]').click()
    expect(page.locator("h1")).to_contain_text("dl-4")
    shot(page, "dead-letter")
    page.fill("input.token", "not-the-token")
    page.click("#replay")
    expect(page.locator("h1")).to_have_text("403")
    expect(page.locator(".error-message")).to_contain_text("needs the token")
    shot(page, "replay-refused")
    page.goto("/dead-letters/dl-4")
    page.fill("input.token", TOKEN)
    page.click("#replay")
    expect(page.locator(".flash")).to_contain_text("Replayed dead letter dl-4")
    expect(page.locator('a[href="/dead-letters/dl-4"]')).to_have_count(0)


def test_time_travel_projections_and_groups(page: Page, demo: Demo) -> None:
    page.goto(f"/s/0/state/{demo.account_stream}?version=2")
    expect(page.locator("pre.state")).to_contain_text('"balance": 100')
    page.keyboard.press("]")
    expect(page.locator("h1")).to_contain_text("at version 3")
    expect(page.locator("pre.state")).to_contain_text('"balance": 70')
    shot(page, "time-travel")
    time.sleep(1.2)  # a few lag samples for the chart (the console samples every 0.5 s here)
    page.goto("/s/0/projections")
    expect(page.locator("table.projections")).to_contain_text("ledger_balances")
    expect(page.locator("svg.chart polyline")).to_have_count(1)
    shot(page, "projections")
    page.goto("/groups")
    expect(page.locator("table.list")).to_contain_text("email")
    shot(page, "groups")
    page.keyboard.press("?")
    expect(page.locator("dialog#help")).to_be_visible()
    shot(page, "keyboard-help")
