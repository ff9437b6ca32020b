"""The browser playground, driven in real headless Chromium (Debian's, installed by `make test`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from conftest import PROJECT_ROOT

SCREENSHOT = PROJECT_ROOT / "tests" / "artifacts" / "playground.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The flags a root, sandbox-less, offline machine needs; without the networking ones Chromium keeps calling home.
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if CHROMIUM is None and os.environ.get("CI"):
    pytest.fail("chromium is missing: `make test` installs it with apt-get", pytrace=False)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it)")


def save_screenshot(page) -> None:
    """The page as a person sees it, kept as a test artifact that git ignores."""
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    png = SCREENSHOT.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert int.from_bytes(png[16:20], "big") == 1280  # IHDR width: the whole viewport
    ignored = subprocess.run(["git", "check-ignore", "-q", str(SCREENSHOT)], cwd=PROJECT_ROOT)
    assert ignored.returncode == 0, "tests/artifacts/ must stay out of the repository"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        yield context.new_page()
        browser.close()


def test_chat_streams_and_sends_every_control(server, page):
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if "/ai/run/" in r.url else None)
    page.goto(server.url + "/")
    page.fill("#system", "You answer briefly.")
    page.fill("#max_tokens", "48")
    page.fill("#seed", "42")
    page.locator("#temperature").fill("0")
    page.check("#use_top_k")
    page.locator("#top_k").fill("10")
    page.fill("#prompt", "Name three colours.")
    page.click("#send")

    reply = page.locator(".message.assistant").last
    reply.locator(".usage").wait_for(timeout=60_000)
    text = reply.locator(".content").inner_text()
    assert text.strip()
    usage = reply.locator(".usage").inner_text()
    assert "completion" in usage and "tokens/s" in usage

    body = sent[-1]
    assert body["stream"] is True
    assert body["messages"] == [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name three colours."},
    ]
    assert body["temperature"] == 0 and body["top_k"] == 10 and body["seed"] == 42 and body["max_tokens"] == 48
    for name in ("top_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
        assert name in body

    # The page streamed what the API answers for the same request.
    import httpx

    whole = httpx.post(
        server.url + "/ai/run/@cf/meta/llama-3.1-8b-instruct-fast", json={**body, "stream": False}, timeout=60
    ).json()["result"]
    assert text.strip() == whole["response"].strip()

    # A second turn carries the first answer back.
    page.fill("#prompt", "And one more?")
    page.click("#send")
    page.locator(".message.assistant").nth(1).locator(".usage").wait_for(timeout=60_000)
    assert [m["role"] for m in sent[-1]["messages"]] == ["system", "user", "assistant", "user"]

    save_screenshot(page)


def test_tools_editor_shows_tool_calls(server, page):
    tool = {
        "name": "getWeather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City"}},
            "required": ["city"],
        },
    }
    page.goto(server.url + "/")
    page.fill("#tools", json.dumps([tool]))
    page.fill("#prompt", "What is the weather in Lisbon?")
    page.click("#send")
    box = page.locator(".message.assistant .tool-calls").last
    box.wait_for(timeout=60_000)
    calls = json.loads(box.inner_text().removeprefix("tool_calls: "))
    assert calls[0]["name"] == "getWeather" and isinstance(calls[0]["arguments"]["city"], str)


def test_bad_tools_json_is_reported_in_the_page(server, page):
    page.goto(server.url + "/")
    page.fill("#tools", "[not json")
    page.fill("#prompt", "Hi")
    page.click("#send")
    page.locator(".message.error").wait_for(timeout=10_000)
    assert "not valid JSON" in page.locator(".message.error").inner_text()


def test_a_chat_through_an_ai_gateway_lists_its_logs(server, page):
    page.goto(server.url + "/")
    page.fill("#gateway", "playground-gateway")
    page.fill("#cache_ttl", "600")
    page.fill("#max_tokens", "8")
    for turn in range(2):  # the same first turn twice: computed, then the cache's
        page.click("#clear")
        page.fill("#prompt", "Name a colour.")
        page.click("#send")
        page.locator(".message.assistant .usage").wait_for(timeout=60_000)
        assert page.locator(".message.assistant .usage").inner_text().endswith("gateway " + ("MISS", "HIT")[turn])
        page.locator("#gateway-logs tbody tr").nth(turn).wait_for(timeout=10_000)
    statuses = [row.locator("td").nth(1).inner_text() for row in page.locator("#gateway-logs tbody tr").all()]
    assert statuses == ["HIT", "MISS"]
