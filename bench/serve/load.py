"""Load generation: prompts of exact token lengths, streamed requests timed chunk by chunk, closed
and open loops."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.harness import ROOT

WORDS_PER_TOKEN = 0.75
"""Text prompts without a tokenizer: a common English rule of thumb, so prompts are only ~N tokens."""


@dataclass
class RequestResult:
    """One streamed completion as the client saw it; times are perf_counter seconds."""

    start: float
    expected_tokens: int
    end: float = 0.0
    ttft: float | None = None
    last_token: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    chunks: int = 0
    prompt_tokens: int | None = None
    server_tpot_ms: float | None = None
    """The server's own mean time per output token, from its usage chunk's `timings` (ours has it)."""
    error: str | None = None


def chunk_tokens(choice: dict[str, Any]) -> int:
    """Tokens in one streamed choice: logprobs list them exactly; otherwise a chunk with text is one."""
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict) and isinstance(logprobs.get("tokens"), list):
        return len(logprobs["tokens"])
    return 1 if choice.get("text") else 0


async def stream_one(client: httpx.AsyncClient, body: dict[str, Any]) -> RequestResult:
    """Send one streaming request; time its token chunks; never raise (errors are results)."""
    result = RequestResult(start=time.perf_counter(), expected_tokens=body["max_tokens"])
    last = result.start
    counted = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"].get("completion_tokens", 0)
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens")
                    result.server_tpot_ms = (chunk.get("timings") or {}).get("time_per_token_ms")
                for choice in chunk.get("choices") or ():
                    n = chunk_tokens(choice)
                    if not n:
                        continue
                    counted += n
                    result.chunks += 1
                    if result.ttft is None:
                        result.ttft = now - result.start
                    else:
                        result.itl.append(now - last)
                    last = result.last_token = now
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        return result
    finally:
        result.end = time.perf_counter()
    result.output_tokens = result.output_tokens or counted  # usage is exact when the server sends it
    if result.ttft is None:
        result.error = "no token received"
    return result


async def run_concurrency(
    client: httpx.AsyncClient, bodies: list[dict[str, Any]], concurrency: int, max_seconds: float
) -> list[RequestResult]:
    """Closed loop: `concurrency` clients, each sending its next request as soon as the last ends."""
    todo = iter(bodies)
    stop_at = time.perf_counter() + max_seconds
    results: list[RequestResult] = []

    async def worker() -> None:
        for body in todo:  # the shared iterator hands each body to exactly one worker
            if time.perf_counter() > stop_at:
                return
            results.append(await stream_one(client, body))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def run_rate(
    client: httpx.AsyncClient,
    bodies: list[dict[str, Any]],
    rate: float,
    max_seconds: float,
    max_concurrency: int | None,
    seed: int,
) -> list[RequestResult]:
    """Open loop: Poisson arrivals at `rate` requests/s (optionally capped in flight)."""
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    start = time.perf_counter()
    tasks: list[asyncio.Task[RequestResult]] = []

    async def send(body: dict[str, Any]) -> RequestResult:
        if limit is None:
            return await stream_one(client, body)
        async with limit:
            return await stream_one(client, body)

    at = 0.0
    for body in bodies:
        at += rng.expovariate(rate)
        if at > max_seconds:
            break
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        tasks.append(asyncio.create_task(send(body)))
    return list(await asyncio.gather(*tasks))


class Tokens:
    """Token ids ↔ text: a local tokenizer.json when we know the checkpoint, else the server's /tokenize."""

    def __init__(self, directory: Path | None, client: httpx.AsyncClient | None) -> None:
        self.local = None
        if directory is not None and (directory / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self.local = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.client = client
        self._corpus: tuple[str, list[int] | None] | None = None

    async def corpus(self, text: str) -> list[int] | None:
        """`text` tokenized once per sweep (it is the same text at every level)."""
        if self._corpus is None or self._corpus[0] != text:
            self._corpus = (text, await self.encode(text))
        return self._corpus[1]

    @property
    def vocab_size(self) -> int | None:
        return self.local.get_vocab_size(with_added_tokens=True) if self.local else None

    async def encode(self, text: str) -> list[int] | None:
        if self.local:
            return self.local.encode(text, add_special_tokens=False).ids
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            assert self.client is not None
            r = await self.client.post("/tokenize", json={"prompt": text})
            if r.status_code == 200:
                return list(r.json()["tokens"])
        return None

    async def decode(self, ids: list[int]) -> str | None:
        if self.local:
            return self.local.decode(ids)
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            assert self.client is not None
            r = await self.client.post("/detokenize", json={"tokens": ids})
            if r.status_code == 200:
                return str(r.json()["prompt"])
        return None


def builtin_text() -> str:
    """Text to cut prompts from when no --prompt-file is given: this repository's own Python sources."""
    return "\n".join(p.read_text(errors="replace") for p in sorted((ROOT / "server").rglob("*.py")))


def lengths(rng: random.Random, mean: int, ratio: float) -> int:
    """Uniform in [mean·(1−ratio), mean·(1+ratio)], at least 1 (ratio 0: exactly `mean`)."""
    return max(1, round(rng.uniform(mean * (1 - ratio), mean * (1 + ratio))))


@dataclass
class PromptSet:
    """Prompts and output lengths for one level; the same seed gives both servers the same requests."""

    prompts: list[list[int] | str]
    max_tokens: list[int]


async def make_prompts(
    args: argparse.Namespace, tokens: Tokens, count: int, seed: int, as_ids: bool
) -> PromptSet:
    rng = random.Random(seed)
    sizes = [lengths(rng, args.prompt_tokens, args.range_ratio) for _ in range(count)]
    outs = [lengths(rng, args.output_tokens, args.output_range_ratio) for _ in range(count)]
    ids: list[list[int]] | None = None
    if args.prompt_file is None and tokens.vocab_size and as_ids:
        # Random ids: exactly N tokens, and no two prompts share a prefix the cache could reuse.
        ids = [[rng.randrange(tokens.vocab_size) for _ in range(n)] for n in sizes]
    else:
        text = args.prompt_file.read_text(errors="replace")[: 4 << 20] if args.prompt_file else builtin_text()
        corpus = await tokens.corpus(text)
        if corpus and len(corpus) > max(sizes):
            # Windows at distinct offsets (while the text is long enough): exactly N tokens each.
            room = len(corpus) - max(sizes)
            offsets = (
                rng.sample(range(room), count) if room >= count else [rng.randrange(room) for _ in sizes]
            )
            ids = [corpus[o : o + n] for o, n in zip(offsets, sizes, strict=True)]
        else:
            words = text.split()
            chosen: list[list[int] | str] = []
            for n in sizes:  # no tokenizer at all: ~N tokens of text
                k = max(1, round(n * WORDS_PER_TOKEN))
                o = rng.randrange(max(1, len(words) - k))
                chosen.append(" ".join(words[o : o + k]))
            return PromptSet(chosen, outs)
    if as_ids:
        return PromptSet(list(ids), outs)
    texts = [await tokens.decode(p) for p in ids]
    return PromptSet([t if t is not None else "" for t in texts], outs)


def request_bodies(args: argparse.Namespace, model: str, prompts: PromptSet) -> list[dict[str, Any]]:
    bodies = []
    for prompt, max_tokens in zip(prompts.prompts, prompts.max_tokens, strict=True):
        body: dict[str, Any] = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": args.temperature,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if args.logprobs:
            body["logprobs"] = 0
        bodies.append(body)
    return bodies
