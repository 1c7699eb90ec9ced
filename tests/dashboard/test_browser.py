"""A real headless Chromium against the real app, a real worker subprocess and a real SMTP sink.

The sink answers 450 to soft@example.com once (saying "try again in 1 hour", so the worker's own retry is
an hour away); the operator logs in, finds the send grouped under that reason, clicks Retry, and watches
the worker deliver it. A screenshot of the failures page goes to artifacts/ (copy it to docs/ for the README).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dashboard_support import (
    AUTH,
    PASSWORD,
    ROOT,
    USER,
    WorkerProcess,
    mail,
    make_config,
    serve,
    state_of,
    worker_env,
)
from helpers import wait_until
from playwright.sync_api import Browser, expect, sync_playwright
from servers.recording import RecordingSmtpServer, Rule

from dispatcher.dashboard import create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SOFT = "soft@example.com"
GROUP = "deferred|recipient|rcpt|450|4.2.0|example.com"


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def worker(
    redis_url: str, tmp_path: Path, smtp_server: Callable[..., RecordingSmtpServer]
) -> Iterator[tuple[WorkerProcess, RecordingSmtpServer]]:
    sink = smtp_server(rules={SOFT: Rule(450, "4.2.0 Busy, try again in 1 hour", times=1)})
    process = WorkerProcess(worker_env(redis_url, sink.port), tmp_path / "worker.log")
    try:
        yield process, sink
    finally:
        code = process.stop()
        assert code == 0, f"worker exited {code}:\n{process.log()}"


def api_enqueue(base: str, body: dict[str, object]) -> str:
    request = urllib.request.Request(
        f"{base}/api/v1/messages",
        data=json.dumps(body).encode(),
        headers={**AUTH, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202
        send_id: str = json.load(response)["id"]
    return send_id


def test_operator_retries_a_deferred_send_from_the_browser(
    worker: tuple[WorkerProcess, RecordingSmtpServer], browser: Browser, redis_url: str
) -> None:
    # ``worker`` (with its sink) first: Playwright's sync API runs an asyncio loop in this thread, and
    # DevSink starts its own loop from the calling thread, which asyncio refuses while another runs.
    process, sink = worker
    with serve(create_app(make_config(redis_url))) as base:
        send_id = api_enqueue(base, mail(to=[SOFT], subject="Browser test: your receipt"))
        wait_until(
            lambda: state_of(redis_url, send_id) == "deferred",
            timeout=30,
            interval=0.05,
            message=f"the worker did not defer the send:\n{process.log()}",
        )
        assert sink.messages == []

        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{base}/failures")
        expect(page).to_have_url(f"{base}/login?next=/failures")
        page.fill("input[name=username]", USER)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        expect(page).to_have_url(f"{base}/failures")

        group = page.locator(f'article[data-group="{GROUP}"]')
        expect(group).to_be_visible()
        expect(group.locator("h3")).to_contain_text("450")
        row = group.locator(f'tr[data-send-id="{send_id}"]')
        expect(row.locator("td.rcpt")).to_have_text(SOFT)
        expect(row).to_contain_text("Browser test: your receipt")
        expect(row.locator("td.reply")).to_contain_text("450 4.2.0 Busy, try again in 1 hour")
        artifacts = ROOT / "artifacts"
        artifacts.mkdir(exist_ok=True)
        page.screenshot(path=str(artifacts / "failures.png"), full_page=True)

        group.get_by_role("button", name="Retry whole group…").click()  # bulk: a confirmation step first
        expect(page.locator("h1")).to_have_text("Retry 1 send?")
        expect(page.locator(".confirm table")).to_contain_text("would retry 1 recipient(s)")
        page.get_by_role("link", name="Cancel").click()
        expect(page).to_have_url(f"{base}/failures")
        assert state_of(redis_url, send_id) == "deferred"

        row.get_by_role("button", name="Retry").click()
        expect(page).to_have_url(f"{base}/sends/{send_id}")
        expect(page.locator(".flash")).to_have_text("Retry: 1 queued.")
        expect(page.locator("#state")).to_have_text("delivered", timeout=30_000)
        expect(page.locator("#recipients")).to_contain_text("accepted")

        [message] = sink.wait_for_messages(1, timeout=10)
        assert message.rcpt_tos == [SOFT]
        assert b"Subject: Browser test: your receipt" in message.data
        assert state_of(redis_url, send_id) == "delivered"

        page.goto(f"{base}/")
        expect(page.locator("#chart rect.bar")).to_have_count(60)
        expect(page.locator('[data-field="delivered_last_hour"]')).to_have_text("1")
        expect(page.locator("#workers tbody tr")).to_have_count(1)
        expect(page.locator("#workers tbody")).to_contain_text("mail-high, mail-default, mail-bulk")
        expect(page.locator("#workers tbody")).to_contain_text("default: ready")
        page.goto(f"{base}/failures")
        expect(page.locator(f'tr[data-send-id="{send_id}"]')).to_have_count(0)
        page.close()
