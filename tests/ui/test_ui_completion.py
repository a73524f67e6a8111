"""The page's Completion mode in a real browser (headless Chromium) against the real server on loopback.

The test checkpoint's tokenizer carries only the ChatML placeholder that `model.train` gives every
tokenizer it makes, so `--ui-mode auto` (the default) opens the page in completion mode. The servers
here run eagerly: what the page does does not depend on the compiled decode path.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.harness import RunningServer
from model.tokenizer import CHATML_TEMPLATE, Tokenizer
from tests.support import wait_idle
from tests.ui.test_ui_chat import LONG, configure, send

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TEXT = "#completion-text"
TEXT_LENGTH = f"() => document.querySelector('{TEXT}').value.length"


@pytest.fixture(scope="module")
def base(start_server: Callable[..., RunningServer], long_checkpoint: Path) -> RunningServer:
    return start_server("--threads", "1", model=long_checkpoint)


@pytest.fixture(scope="module")
def keyed_chat(start_server: Callable[..., RunningServer], ui_api_key: str) -> RunningServer:
    return start_server("--threads", "1", "--ui-mode", "chat", "--api-key", ui_api_key)


def open_page(page: Any, server: RunningServer, mode: str) -> None:
    page.goto(server.url + "/")
    page.wait_for_function(
        "name => document.getElementById('model-name').textContent === name", arg=server.model
    )
    page.wait_for_function("mode => document.body.dataset.mode === mode", arg=mode)


def complete(page: Any, prompt: str) -> None:
    page.fill(TEXT, prompt)
    page.press(TEXT, "Control+Enter")


def test_how_the_mode_is_decided(base: RunningServer, keyed_chat: RunningServer, ui_api_key: str) -> None:
    """auto: completion for a base model, i.e. a tokenizer without a chat template of its own (the
    shipped model's is model.train's placeholder); the flag wins; the answer is behind the key."""
    assert not Tokenizer.load(ROOT / "weights" / "default").declares_chat
    with base.client() as client:
        config = client.get("/ui/config").json()
    assert config["mode"] == "completion" and "base model" in config["mode_reason"]
    with keyed_chat.client() as client:
        assert client.get("/ui/config").status_code == 401
        keyed = client.get("/ui/config", headers={"Authorization": f"Bearer {ui_api_key}"})
        assert keyed.json() == {"mode": "chat", "mode_reason": "--ui-mode"}
    own = Tokenizer.load(ROOT / "weights" / "default")
    own.chat_template = CHATML_TEMPLATE.replace("assistant", "model")
    assert own.declares_chat  # any template but the placeholder declares a chat model


def test_completion_streams_in_place_and_stops(page: Any, base: RunningServer, tmp_path: Path) -> None:
    server = base
    open_page(page, server, "completion")
    assert page.locator("#completion").is_visible() and page.locator("#input").is_hidden()
    assert "monospace" in page.locator(TEXT).evaluate("e => getComputedStyle(e).fontFamily")
    bodies: list[dict[str, Any]] = []
    completions = "/v1/completions"
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith(completions) else None)

    # Greedy: the text in the box is the prompt followed by exactly what the API returns for it.
    prompt = "def fibonacci(n):\n"
    configure(page, temperature=0, max_tokens=24, extra={"ignore_eos": True})
    complete(page, prompt)
    page.wait_for_selector("#complete:not([hidden])")
    page.wait_for_function(f"() => !document.querySelector('{TEXT}').readOnly")
    body = {"model": server.model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    with server.client() as client:
        want = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    # (a text box reads a carriage return back as a line feed, as HTML specifies; random weights emit some)
    assert page.input_value(TEXT) == prompt + want.replace("\r\n", "\n").replace("\r", "\n"), repr(want)
    assert bodies[0]["prompt"] == prompt and bodies[0]["stream"] is True and bodies[0]["max_tokens"] == 24
    stats = page.locator("#completion-stats").inner_text()
    assert re.search(r"TTFT \d+ ms", stats) and "24 tokens" in stats and "max tokens reached" in stats, stats
    page.screenshot(path=str(tmp_path / "completed.png"))

    # Complete again: the request continues the whole text; Undo puts back what was there before.
    before = page.input_value(TEXT)
    page.click("#complete")
    page.wait_for_selector("#completion-undo:not([hidden])")
    assert bodies[1]["prompt"] == before and page.input_value(TEXT).startswith(before)
    page.click("#completion-undo")
    assert page.input_value(TEXT) == before

    # A long one grows in place while it streams; Stop frees the server's slot and cache.
    configure(page, max_tokens=LONG)
    with server.client() as probe:
        steps_before = wait_idle(probe)["steps"]
        complete(page, prompt)
        page.wait_for_function(f"n => {TEXT_LENGTH}() >= n", arg=len(prompt) + 20)
        lengths = []
        for _ in range(6):
            lengths.append(page.evaluate(TEXT_LENGTH))
            time.sleep(0.15)
        growth = sum(b > a for a, b in zip(lengths, lengths[1:], strict=False))
        assert growth >= 3, f"the text did not grow while streaming: {lengths}"
        assert page.locator(TEXT).evaluate("e => e.readOnly")
        page.screenshot(path=str(tmp_path / "streaming.png"))
        page.click("#complete-stop")
        stats = wait_idle(probe)
        assert (stats["running"], stats["kv_used_tokens"]) == (0, 0), stats
        assert stats["steps"] - steps_before < LONG * 3 // 4, stats
    page.wait_for_selector("#complete:not([hidden])")
    assert "stopped" in page.locator("#completion-stats").inner_text()
    assert page.input_value(TEXT).startswith(prompt) and len(page.input_value(TEXT)) > len(prompt)

    # Errors are shown beside the box, with a retry.
    page.locator("#extra").evaluate(
        "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", json.dumps({"top_k": -5})
    )
    complete(page, prompt)
    error = page.locator("#completion-error")
    error.wait_for()
    assert "Error 400" in error.inner_text() and "top_k" in error.inner_text()
    assert page.input_value(TEXT) == prompt


def test_chat_is_one_click_away(page: Any, base: RunningServer) -> None:
    server = base
    open_page(page, server, "completion")
    page.click("#mode-chat")
    assert page.locator("#input").is_visible() and page.locator("#completion").is_hidden()
    assert page.get_attribute("#mode-chat", "aria-pressed") == "true"
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url) if "/v1/" in r.url and r.method == "POST" else None)
    configure(page, max_tokens=8)
    send(page, "Hello")
    page.wait_for_selector(".msg.assistant.done")
    assert urls and all(u.endswith("/v1/chat/completions") for u in urls)
    page.click("#mode-completion")
    assert page.locator("#completion").is_visible() and page.locator("#input").is_hidden()
    page.reload()  # a new load opens as the server says again
    page.wait_for_function("() => document.body.dataset.mode === 'completion'")
