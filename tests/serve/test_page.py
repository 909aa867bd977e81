"""The browser page in a real headless Chromium, against the real server and the tiny fixture model.

What is checked is what a person sees: the image picked through the file input, the answer
streamed into the page equal to the API's answer for the same conversation at temperature 0
(so the page's SSE reading and history resending lose nothing), the timings shown, a
follow-up answered with the whole history, and a server error shown as the server's sentence.
The SSE parser is also fed a stream cut at every possible place, since a local server tends
to send each event in one piece and would never exercise the reassembly.

This is the ``browser`` lane (``make test-browser``): it needs a system Chromium, because
Playwright cannot download its own browser here. Without one the tests fail, saying how to
install it: a lane that skips would pass while checking nothing. ``make test`` deselects it.
A screenshot of the conversation is saved to ``test-artifacts/serve_page.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import fixture_path
from tests.serve.conftest import TINY, fixture_image_url, user_turn
from tests.serve.live import live_server

pytestmark = pytest.mark.browser

API_KEY = "page-test-key"
MAX_TOKENS = 24  # the page's "Max tokens" setting, and the API comparison's
ANSWER_TIMEOUT_MS = 120_000
STEP_TIMEOUT_MS = 15_000  # anything but an answer
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = (
    "install it with `apt-get install -y chromium` (Debian/Ubuntu; .ci/run does this), "
    "or point FASTVLM_CHROMIUM at a Chromium or Chrome executable"
)


def chromium_executable() -> str:
    """The system browser for Playwright: FASTVLM_CHROMIUM, else the first Chromium on PATH."""
    explicit = os.environ.get("FASTVLM_CHROMIUM")
    if explicit:
        if not Path(explicit).is_file():
            pytest.fail(f"FASTVLM_CHROMIUM={explicit} is not a file; {INSTALL_HINT}", pytrace=False)
        return explicit
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(f"no Chromium found on PATH (looked for {', '.join(CHROMIUM_NAMES)}); {INSTALL_HINT}", pytrace=False)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser lane needs Playwright: pip install -e '.[dev]'", pytrace=False)
    executable = chromium_executable()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with live_server(fixture_path(TINY), api_key=API_KEY) as base_url:
        yield base_url


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Any]:
    """A fresh page at GET /, its module loaded; JavaScript exceptions fail the test."""
    context = browser.new_context(viewport={"width": 900, "height": 900})
    page = context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    crashes: list[str] = []
    page.on("pageerror", lambda error: crashes.append(str(error)))
    page.goto(server)
    page.wait_for_selector("body[data-ready]")
    yield page
    context.close()
    assert not crashes, f"the page raised: {crashes}"


def get_json(url: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def post_json(url: str, body: dict, api_key: str = API_KEY) -> tuple[int, dict]:
    """A plain HTTP POST (no streaming): status and parsed JSON body, errors included."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=ANSWER_TIMEOUT_MS / 1000) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def api_answer(server: str, messages: list[dict]) -> dict:
    status, body = post_json(
        f"{server}/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS}
    )
    assert status == 200, body
    return body


def ask(page: Any, question: str, *, with_enter: bool = False) -> None:
    page.fill("#question", question)
    if with_enter:
        page.press("#question", "Enter")
    else:
        page.click("#send")


def fill_settings(page: Any, *, api_key: str) -> None:
    """Enter the API key and the token limit in Settings (the key is used from its change event on)."""
    if not page.is_visible("#api-key"):  # the page opens Settings itself when /v1/models wants a key
        page.click("#settings summary")
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.fill("#api-key", api_key)
    page.press("#api-key", "Tab")


def test_the_streamed_answers_equal_the_api_answers_and_the_conversation_continues(page, server, golden):
    fill_settings(page, api_key=API_KEY)
    models = get_json(f"{server}/v1/models")
    page.wait_for_function("id => document.getElementById('model').textContent === id", arg=models["data"][0]["id"])

    page.set_input_files("#image-input", str(fixture_path(TINY, "image.png")))
    page.wait_for_selector("#thumbnail[src^='data:image/png;base64,']")
    question = golden["question"]
    ask(page, question)
    page.wait_for_selector("#answer-1[data-state='done']", timeout=ANSWER_TIMEOUT_MS)

    first_turn = [user_turn(question, fixture_image_url())]
    expected = api_answer(server, first_turn)
    answer = expected["choices"][0]["message"]["content"]
    assert answer, "the fixture model answered nothing; the comparison would prove little"
    assert page.text_content("#answer-1 .text") == answer
    stats = page.text_content("#timings-1")
    usage = expected["usage"]
    for label in ("TTFT", "Vision", "Prefill", "tokens/s"):
        assert label in stats
    assert f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion" in stats
    assert page.is_disabled("#image-input"), "the image belongs to the conversation once it has started"

    follow_up = "And what colour is it?"
    ask(page, follow_up, with_enter=True)
    page.wait_for_selector("#answer-2[data-state='done']", timeout=ANSWER_TIMEOUT_MS)
    history = [*first_turn, {"role": "assistant", "content": answer}, user_turn(follow_up)]
    assert page.text_content("#answer-2 .text") == api_answer(server, history)["choices"][0]["message"]["content"]
    assert page.is_hidden("#error")

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve_page.png"), full_page=True)

    page.click("#new-conversation")
    assert page.locator("#messages > li").count() == 0
    assert page.is_enabled("#image-input") and page.is_hidden("#preview")


def test_a_wrong_api_key_shows_the_servers_message_and_keeps_the_question(page, server):
    fill_settings(page, api_key="not-the-key")
    page.wait_for_function("() => document.getElementById('model').textContent.includes('API key')")
    page.set_input_files("#image-input", str(fixture_path(TINY, "image.png")))
    ask(page, "What is written on the sign?")
    page.wait_for_selector("#error:not([hidden])", timeout=ANSWER_TIMEOUT_MS)

    status, body = post_json(f"{server}/v1/chat/completions", {"messages": []}, api_key="not-the-key")
    assert status == 401
    shown = page.text_content("#error")
    message = body["error"]["message"].split(" (request id ")[0]  # each request has its own id
    assert message in shown and "(request id req-" in shown and "HTTP 401" in shown
    assert "[object Object]" not in shown
    assert page.input_value("#question") == "What is written on the sign?"  # put back, ready to retry
    assert page.locator("#messages > li").count() == 0  # the failed turn left no trace in the history
    page.screenshot(path=str(ARTIFACTS / "serve_page_error.png"), full_page=True)


@pytest.mark.parametrize(
    ("status", "content_type", "body", "shown"),
    [
        (502, "text/html", "<html><body><h1>502 Bad Gateway</h1></body></html>", "502 Bad Gateway (HTTP 502)."),
        (200, "text/event-stream", 'data: {"choices": [{"delta": {"content": "Hal"}}]}\n\n', "closed early"),
        (200, "text/event-stream", "data: {not json\n\n", "not JSON: {not json"),
    ],
    ids=["proxy-html", "cut-short", "garbled"],
)
def test_answers_that_are_not_openai_shaped_still_read_as_sentences(page, status, content_type, body, shown):
    """What a proxy or a broken connection may return instead of the server's answer (intercepted here)."""
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=status, headers={"Content-Type": content_type}, body=body),
    )
    ask(page, "Anything?")
    page.wait_for_selector("#error:not([hidden])")
    assert shown in page.text_content("#error")
    assert page.input_value("#question") == "Anything?"


def test_the_sse_parser_reassembles_events_cut_anywhere(page):
    stream = (
        ": a comment line\r\n"
        'data: {"a": "é✓"}\r\n\r\n'
        "data:first line\n"
        "data: second line\n\n"
        "event: ignored\rdata: [DONE]\r\r"
    )
    expected = ['{"a": "é✓"}', "first line\nsecond line", "[DONE]"]
    results = page.evaluate(
        """async (stream) => {
            const { SSEParser } = await import("./static/app.js");
            const results = [];
            for (let i = 0; i <= stream.length; i++) {
                for (let j = i; j <= stream.length; j++) {
                    const parser = new SSEParser();
                    const parts = [stream.slice(0, i), stream.slice(i, j), stream.slice(j)];
                    results.push([...parts.flatMap((part) => parser.push(part)), ...parser.end()]);
                }
            }
            return results;
        }""",
        stream,
    )
    assert results and all(events == expected for events in results)
