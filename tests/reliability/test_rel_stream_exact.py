"""Streams are exact: over 200+ prompts of emoji, CJK and code, the concatenated stream equals the
non-streamed text byte for byte (same seed), stop strings never leak, and no U+FFFD appears that the
full text lacks. Requests run 8 at a time, so every one shares its batch with others."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from bench.harness import RunningServer
from tests.reliability.rel_support import json_body, port_of, request, stream_text

EMOJI = ["😀", "🚀", "👩‍💻", "🇯🇵", "❤️", "🧪", "🐍", "✨", "👍🏽"]
CJK = ["你好，世界", "日本語のテキスト", "한국어", "漢字かな交じり文", "中文标点：「」。", "東京タワー"]
CODE = [
    "def f(x):\n    return x * 2\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "SELECT * FROM t WHERE id = 42;",
    '{"key": [1, 2, {"nested": null}]}',
    'fn main() { println!("hi"); }',
    "if err != nil {\n\treturn err\n}",
    '<div class="x">&amp;</div>',
]
WORDS = ["hello", "world", "json", "decoder", "text", "wrap", "héllo", "wörld", "the", "quick"]
PROMPTS = 220
CONCURRENCY = 8


def make_prompt(rng: random.Random) -> str:
    parts = [rng.choice(pool) for pool in rng.sample([EMOJI, CJK, CODE, WORDS], k=rng.randint(2, 4))]
    return " ".join(parts)


def plan(rng: random.Random, i: int, model: str) -> tuple[str, dict[str, Any]]:
    text = make_prompt(rng)
    sampling = {
        "seed": i,
        "max_tokens": rng.randint(6, 24),
        "temperature": rng.choice([0, 0.7, 1.0, 1.3]),
        "top_p": rng.choice([1.0, 0.9]),
    }
    if i % 3 == 0:
        return "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": text}],
                                        **sampling}  # fmt: skip
    if i % 7 == 1:
        sampling["n"] = 2
    return "/v1/completions", {"model": model, "prompt": text, **sampling}


async def complete(port: int, path: str, body: dict[str, Any]) -> dict[int, str]:
    r = await request(port, "POST", path, json_body(body))
    assert r.status == 200, r.body[:300]
    choices = r.json()["choices"]
    chat = path.endswith("chat/completions")
    return {c["index"]: c["message"]["content"] if chat else c["text"] for c in choices}


async def streamed(port: int, path: str, body: dict[str, Any]) -> dict[int, str]:
    r = await request(port, "POST", path, json_body({**body, "stream": True}))
    assert r.status == 200 and r.events and r.events[-1] == "[DONE]", r.events[-3:]
    assert not any(isinstance(e, dict) and "error" in e for e in r.events)
    return stream_text(r.events, chat=path.endswith("chat/completions"))


def stop_inside(text: str, rng: random.Random) -> str | None:
    """A short piece of `text` (after its first character, without U+FFFD) to use as a stop string."""
    for _ in range(10):
        if len(text) < 4:
            return None
        start = rng.randint(1, len(text) - 2)
        piece = text[start : start + rng.randint(1, 3)]
        if piece and "\ufffd" not in piece:
            return piece
    return None


def test_streamed_text_equals_full_text(default_server: RunningServer) -> None:
    port = port_of(default_server.url)
    rng = random.Random(1234)
    jobs = [plan(rng, i, default_server.model) for i in range(PROMPTS)]
    stats = {"pairs": 0, "stopped": 0, "replacement_chars": 0, "multibyte_chars": 0}

    async def check(i: int, path: str, body: dict[str, Any], gate: asyncio.Semaphore) -> None:
        async with gate:
            full = await complete(port, path, body)
            stream = await streamed(port, path, body)
            assert stream == full, (i, body, full, stream)
            stats["pairs"] += 1
            stats["replacement_chars"] += sum(t.count("\ufffd") for t in full.values())
            stats["multibyte_chars"] += sum(c > "\x7f" and c != "\ufffd" for t in full.values() for c in t)
            stop = stop_inside(full[0], random.Random(i))
            if i % 2 or stop is None:
                return
            # With a stop string taken from the text: both end right before its first occurrence.
            stopped = {**body, "stop": [stop]}
            cut_full = await complete(port, path, stopped)
            cut_stream = await streamed(port, path, stopped)
            expected = full[0][: full[0].index(stop)]
            assert cut_full[0] == expected and cut_stream[0] == expected, (i, stop, full, cut_stream)
            assert all(stop not in t for t in (*cut_full.values(), *cut_stream.values()))
            stats["stopped"] += 1

    async def main() -> None:
        gate = asyncio.Semaphore(CONCURRENCY)
        await asyncio.gather(*(check(i, path, body, gate) for i, (path, body) in enumerate(jobs)))

    asyncio.run(main())
    assert stats["pairs"] == PROMPTS and stats["stopped"] >= 40, stats
    # Not vacuous: the random-weight model emits multi-byte characters, and splits others (U+FFFD in
    # the full text too), so held-back bytes are exercised on both paths.
    assert stats["multibyte_chars"] > 0 and stats["replacement_chars"] > 0, stats
