"""The chat page in a real browser (headless Chromium) against the real server on loopback.

The tiny checkpoint has random weights, so what the model says is noise: tests check how text arrives
(it grows while streaming, stops when told), what the page sends, and how it shows timings and errors.
Hostile model HTML is fed to the page's render function directly, and through a scripted stream.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.harness import RunningServer
from tests.support import wait_idle

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "server" / "static"
DOCS_SCREENSHOT = ROOT / "docs" / "chat-ui.png"
LONG = 6000
"""max_tokens of a reply meant to be stopped: at ~1-3 ms a token it would run for many seconds."""

REPLY = ".msg.assistant:last-child .reply"
REPLY_LENGTH = f"() => document.querySelector('{REPLY}').textContent.length"


def open_chat(page: Any, server: RunningServer) -> None:
    page.goto(server.url + "/")
    page.wait_for_function(
        "name => document.getElementById('model-name').textContent === name", arg=server.model
    )


def configure(page: Any, **settings: Any) -> None:
    """Fill the settings panel as a user would (ranges through their input event)."""
    page.click("#settings-toggle")
    if "system" in settings:
        page.fill("#system-prompt", settings["system"])
    for name, selector in (("temperature", "#temperature"), ("top_p", "#top-p")):
        if name in settings:
            page.locator(selector).evaluate(
                "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", str(settings[name])
            )
    if "max_tokens" in settings:
        page.fill("#max-tokens", str(settings["max_tokens"]))
    if "json" in settings:
        page.locator("#json-mode").set_checked(settings["json"])
    if "extra" in settings:
        page.locator("details.advanced summary").click()
        page.fill("#extra", json.dumps(settings["extra"]))
    page.click("#settings-close")


def send(page: Any, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def chat_requests(page: Any) -> list[dict[str, Any]]:
    """Bodies of the page's chat requests, as they are sent."""
    bodies: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None,
    )
    return bodies


def wait_streaming(page: Any, min_length: int = 20) -> None:
    page.wait_for_function(
        "([sel, n]) => { const r = document.querySelector(sel); return r && r.textContent.length >= n; }",
        arg=[REPLY, min_length],
    )


def test_static_files_are_served_and_never_inject_html(ui_servers: dict[str, RunningServer]) -> None:
    server = ui_servers["keyed"]  # the page itself needs no key, even where the API does
    with httpx.Client(base_url=server.url, timeout=10) as client:
        index = client.get("/")
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in index.headers["content-security-policy"]
        for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
            r = client.get(f"/static/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert client.get("/static/nope.js").status_code == 404
        assert client.get("/static/..%2Fui.py").status_code == 404
        assert client.get("/v1/models").status_code == 401
    # Model text reaches the DOM through textContent only: no HTML-parsing sink anywhere in the script.
    script = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "DOMParser", "eval("):
        assert sink not in script


def test_reply_streams_and_stop_aborts_it_on_the_server(
    page: Any, ui_servers: dict[str, RunningServer], tmp_path: Path
) -> None:
    server = ui_servers["open"]
    open_chat(page, server)
    configure(page, max_tokens=LONG, extra={"ignore_eos": True})
    with server.client() as probe:
        steps_before = wait_idle(probe)["steps"]
        send(page, "Tell me a long story")
        wait_streaming(page)
        lengths = []
        for _ in range(6):
            lengths.append(page.evaluate(REPLY_LENGTH))
            time.sleep(0.15)
        assert page.locator(".msg.assistant.streaming").count() == 1, "the reply finished too soon"
        growth = sum(b > a for a, b in zip(lengths, lengths[1:], strict=False))
        assert growth >= 3 and lengths[-1] > lengths[0], f"the reply did not grow while streaming: {lengths}"
        assert page.locator("#stop").is_visible() and not page.locator("#send").is_visible()
        page.screenshot(path=str(tmp_path / "streaming.png"))
        busy = probe.get("/stats").json()
        assert busy["running"] == 1 and busy["kv_used_tokens"] > 0

        page.click("#stop")
        stats = wait_idle(probe)
        assert (stats["running"], stats["waiting"], stats["kv_used_tokens"]) == (0, 0, 0), stats
        # Run to the end it would have taken LONG steps; aborted, it took far fewer (steps, not seconds:
        # the bound holds whatever the machine's speed).
        assert stats["steps"] - steps_before < LONG * 3 // 4, stats

    page.wait_for_selector(".msg.assistant.stopped")
    frozen = page.evaluate(REPLY_LENGTH)
    time.sleep(0.3)
    assert page.evaluate(REPLY_LENGTH) == frozen, "text kept arriving after Stop"
    meta = page.locator(".msg.assistant:last-child .meta").inner_text()
    assert re.search(r"TTFT \d+ ms", meta) and re.search(r"\d+(\.\d+)? tok/s", meta), meta
    assert "stopped" in meta
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    page.screenshot(path=str(tmp_path / "stopped.png"))


def test_conversation_settings_timings_and_layout(
    page: Any, ui_servers: dict[str, RunningServer], tmp_path: Path
) -> None:
    server = ui_servers["open"]
    open_chat(page, server)
    bodies = chat_requests(page)
    system = "You are a terse assistant."
    configure(page, system=system, temperature=0.5, top_p=0.9, max_tokens=24, extra={"ignore_eos": True})

    send(page, "Hello there")
    page.wait_for_selector(".msg.assistant.done")
    meta = page.locator(".msg.assistant:last-child .meta").inner_text()
    assert re.search(r"TTFT \d+ ms", meta) and re.search(r"\d+(\.\d+)? tok/s", meta), meta
    assert "24 tokens" in meta and "max tokens reached" in meta, meta
    first_reply = page.evaluate("() => window.chatUI.state.turns[0].reply")
    assert first_reply

    # Shift+Enter is a new line, not a send; Enter sends.
    page.fill("#input", "line one")
    page.press("#input", "Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#input") == "line one\nline two"
    assert len(bodies) == 1
    page.press("#input", "Enter")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant.done').length === 2")
    assert page.locator(".msg.user .bubble").last.inner_text() == "line one\nline two"

    second = bodies[1]
    assert second["model"] == server.model and second["stream"] is True
    assert (second["temperature"], second["top_p"], second["max_tokens"]) == (0.5, 0.9, 24)
    assert second["ignore_eos"] is True
    roles = [m["role"] for m in second["messages"]]
    assert roles == ["system", "user", "assistant", "user"], roles
    assert second["messages"][0]["content"] == system
    assert second["messages"][1]["content"] == "Hello there"
    assert second["messages"][2]["content"] == first_reply
    assert second["messages"][3]["content"] == "line one\nline two"
    page.click("#settings-toggle")
    page.screenshot(path=str(tmp_path / "settings-wide.png"))
    if os.environ.get("UPDATE_UI_SCREENSHOT"):  # refresh the README's picture on request only
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(DOCS_SCREENSHOT))
    page.click("#settings-close")

    # Settings survive a reload (localStorage).
    page.reload()
    page.click("#settings-toggle")
    assert page.input_value("#system-prompt") == system and page.input_value("#max-tokens") == "24"
    page.click("#settings-toggle")

    send(page, "Again")
    page.wait_for_selector(".msg.assistant.done")
    page.screenshot(path=str(tmp_path / "chat-wide.png"))

    # A narrow window (a phone): nothing overflows sideways, and the composer stays usable.
    page.set_viewport_size({"width": 390, "height": 780})
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    assert page.locator("#input").is_visible() and page.locator("#send").is_visible()
    page.screenshot(path=str(tmp_path / "chat-narrow.png"))
    page.click("#settings-toggle")
    assert page.locator("#settings").is_visible()
    page.screenshot(path=str(tmp_path / "settings-narrow.png"))
    page.click("#settings-close")

    # New chat forgets the history: the next request carries only the system prompt and the new message.
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.locator("#empty").is_visible()
    send(page, "Fresh start")
    page.wait_for_selector(".msg.assistant.done")
    assert [m["role"] for m in bodies[-1]["messages"]] == ["system", "user"]


HOSTILE = [
    '<img src=x onerror="window.__pwned = 1">',
    "<script>window.__pwned = 2</script>",
    '```html\n<img src=x onerror="window.__pwned = 3">\n<b>bold?</b>\n```',
    'inline `<svg onload=window.__pwned=4>` and <iframe src="javascript:window.__pwned=5"></iframe>',
    '<a href="javascript:window.__pwned=6">click</a><style>body{display:none}</style>',
]


def test_model_html_is_shown_as_text_never_run(page: Any, ui_servers: dict[str, RunningServer]) -> None:
    server = ui_servers["open"]
    open_chat(page, server)
    result = page.evaluate(
        """texts => texts.map(text => {
            const box = document.createElement('div');
            document.body.append(box);
            window.chatUI.renderMarkdown(box, text);
            const tags = [...box.querySelectorAll('*')].map(e => e.tagName.toLowerCase());
            return {tags, text: box.textContent, visible: box.innerText};
        })""",
        HOSTILE,
    )
    for text, out in zip(HOSTILE, result, strict=True):
        assert set(out["tags"]) <= {"div", "span", "pre", "code", "button"}, (text, out["tags"])
        for line in text.splitlines():
            if not line.startswith("```"):
                assert line.replace("`", "") in out["text"].replace("`", ""), (line, out["text"])
    fenced = result[2]
    assert "pre" in fenced["tags"] and "<b>bold?</b>" in fenced["visible"]
    # The same through the streaming path: a scripted reply full of markup.
    hostile_stream = "".join(
        f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': t + chr(10)}}]})}\n\n"
        for t in HOSTILE
    )
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(
            status=200, content_type="text/event-stream", body=hostile_stream + "data: [DONE]\n\n"
        ),
    )
    send(page, "say something nasty")
    page.wait_for_selector(".msg.assistant.done")
    time.sleep(0.3)  # an onerror/onload would have fired by now
    assert page.evaluate("() => window.__pwned") is None
    assert page.locator(".messages img, .messages script, .messages iframe, .messages svg").count() == 0
    assert "<img src=x onerror=" in page.locator(REPLY).inner_text()


def test_json_toggle_and_tool_call_blocks(page: Any, ui_servers: dict[str, RunningServer]) -> None:
    server = ui_servers["open"]
    open_chat(page, server)
    bodies = chat_requests(page)
    configure(page, json=True, max_tokens=40)
    send(page, "Answer in JSON")
    page.wait_for_selector(".msg.assistant.done")
    assert bodies[-1]["response_format"] == {"type": "json_object"}
    assert page.locator(REPLY).inner_text().startswith("{")
    page.reload()  # the toggle is a saved setting
    page.click("#settings-toggle")
    assert page.locator("#json-mode").is_checked()
    page.locator("#json-mode").set_checked(False)
    page.click("#settings-close")

    # A reply that calls tools (scripted, in OpenAI's chunk shape): each call is its own readable block.
    arguments = '{"city": "<img src=x onerror=window.__pwned=7>", "days": [1, 2]}'
    pieces = [
        {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]},
        {"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                         "function": {"name": "get_time", "arguments": "{}"}}]},
    ]  # fmt: skip
    events = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in pieces]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=stream),
    )
    send(page, "Weather and time?")
    page.wait_for_selector(".msg.assistant.done")
    blocks = page.locator(".msg.assistant:last-child .tool-call")
    assert blocks.count() == 2
    assert blocks.nth(0).locator(".tool-call-head").inner_text() == "Tool call: get_weather"
    assert json.loads(blocks.nth(0).locator(".tool-call-args").inner_text()) == json.loads(arguments)
    assert blocks.nth(1).locator(".tool-call-head").inner_text() == "Tool call: get_time"
    assert "tool calls" in page.locator(".msg.assistant:last-child .meta").inner_text()
    assert page.evaluate("() => window.__pwned") is None
    # The calls go back to the model in the next request's history.
    page.unroute("**/v1/chat/completions")
    send(page, "Thanks")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant.done').length === 2")
    reply = bodies[-1]["messages"][-2]
    assert reply["role"] == "assistant" and [c["id"] for c in reply["tool_calls"]] == ["call_1", "call_2"]


@contextmanager
def busy_server(server: RunningServer) -> Iterator[None]:
    """Fill the open server (1 running, 1 waiting): the next request is turned away with a 503."""
    body = {"model": server.model, "prompt": "fill", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    clients = [server.client() for _ in range(2)]
    responses = []
    try:
        for client in clients:
            request = client.build_request("POST", "/v1/completions", json=body)
            responses.append(client.send(request, stream=True))
            assert responses[-1].status_code == 200
        with server.client() as probe:
            deadline = time.monotonic() + 30
            while (s := probe.get("/stats").json())["running"] + s["waiting"] < 2:
                assert time.monotonic() < deadline, s
                time.sleep(0.05)
        yield
    finally:
        for response in responses:
            response.close()  # a dropped connection aborts the request
        for client in clients:
            client.close()
        with server.client() as probe:
            wait_idle(probe)


def test_errors_are_shown_in_the_conversation(page: Any, ui_servers: dict[str, RunningServer]) -> None:
    server = ui_servers["open"]
    open_chat(page, server)
    configure(page, max_tokens=8)

    # 503: the real server is full.
    with busy_server(server):
        send(page, "anyone there?")
        error = page.locator(".msg.assistant.error .error-box").last
        error.wait_for()
        assert "Error 503" in error.inner_text() and "Retry in 1 s" in error.inner_text()

    # An error event in the middle of a stream: the partial reply stays, the error shows under it.
    partial = json.dumps({"choices": [{"index": 0, "delta": {"content": "partial answer"}}]})
    failure = json.dumps({"error": {"message": "the engine failed", "type": "server_error"}})
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(
            status=200, content_type="text/event-stream",
            body=f"data: {partial}\n\ndata: {failure}\n\ndata: [DONE]\n\n",
        ),
    )  # fmt: skip
    send(page, "tell me")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant.error').length === 2")
    last = page.locator(".msg.assistant").last
    assert last.locator(".reply").inner_text() == "partial answer"
    assert "the engine failed" in last.locator(".error-box").inner_text()

    # The network is gone: the request never reaches a server.
    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", lambda route: route.abort("connectionfailed"))
    send(page, "hello?")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant.error').length === 3")
    assert "Network error" in page.locator(".msg.assistant .error-box").last.inner_text()

    # Back online, Retry resends the failed message; failed turns stay out of the history it sends.
    page.unroute("**/v1/chat/completions")
    bodies = chat_requests(page)
    page.locator(".msg.assistant .retry").last.click()
    page.wait_for_selector(".msg.assistant.done")
    assert [m["content"] for m in bodies[-1]["messages"]] == ["hello?"]


def test_api_key_prompt_then_chat_then_connection_loss(
    page: Any, ui_servers: dict[str, RunningServer], ui_api_key: str, tmp_path: Path
) -> None:
    server = ui_servers["killed"]
    page.goto(server.url + "/")
    page.wait_for_selector("#key-form:not([hidden])")
    assert page.locator("#model-name").inner_text() == "locked"
    page.screenshot(path=str(tmp_path / "key-prompt.png"))

    send(page, "hi")  # without the key: the 401 is shown, not swallowed
    error = page.locator(".msg.assistant.error .error-box")
    error.wait_for()
    assert "Error 401" in error.inner_text()

    page.fill("#api-key", "wrong-key")
    page.press("#api-key", "Enter")
    page.wait_for_selector("#key-error:not([hidden])")
    assert "refused" in page.locator("#key-error").inner_text()

    page.fill("#api-key", ui_api_key)
    page.press("#api-key", "Enter")
    page.wait_for_function(
        "name => document.getElementById('model-name').textContent === name", arg=server.model
    )
    assert page.locator("#key-form").is_hidden()
    assert page.evaluate("() => sessionStorage.getItem('tinyserve.chat.apiKey')") == ui_api_key
    assert ui_api_key not in page.evaluate("() => JSON.stringify(localStorage)")

    configure(page, max_tokens=16)
    send(page, "hello with a key")
    page.wait_for_selector(".msg.assistant.done")
    page.screenshot(path=str(tmp_path / "keyed.png"))

    # The server dies mid-reply: the page says the connection was lost.
    configure(page, max_tokens=LONG, extra={"ignore_eos": True})
    send(page, "a long one")
    wait_streaming(page)
    server.stop(signal.SIGKILL)
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant.error').length === 2")
    assert "Connection lost" in page.locator(".msg.assistant .error-box").last.inner_text()
