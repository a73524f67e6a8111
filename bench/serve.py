"""Serving benchmark: a load generator for any OpenAI-compatible server, a sweep, plots and a baseline.

Streams `/v1/completions` (httpx, asyncio) with prompts of a fixed token length (random token ids, or
windows of a text file) and exact output lengths (`ignore_eos`, fixed `max_tokens`), at a list of
concurrency levels (closed loop: N clients, each sends its next request when the last one ends) or of
request rates (open loop: Poisson arrivals). Per level: output tokens/s, requests/s, p50/p90/p99 of time
to first token (TTFT), inter-token latency (ITL: the gaps between streamed token chunks) and end-to-end
latency, errors, and the server's own figures where it reports them (time per token in the usage chunk's
`timings`, mean step time from a step-duration histogram on /metrics).
Writes JSON, CSV, a Markdown table and PNG plots (matplotlib: `pip install -e '.[bench]'`).

    # against a running server (loopback only unless --allow-remote)
    .venv/bin/python bench/serve.py --base-url http://127.0.0.1:8000 --concurrency 1,4,16
    # start our server (and, with --compare-hf, the naive transformers baseline) on free loopback ports
    .venv/bin/python bench/serve.py --random-110m --threads 2 --dtypes float32,bfloat16 --compare-hf

Every level is bounded by --num-requests and --max-level-seconds, every request by --request-timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import ipaddress
import json
import math
import os
import platform
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
PERCENTILES = (50, 90, 99)
START_TIMEOUT = 600.0
WORDS_PER_TOKEN = 0.75
"""Text prompts without a tokenizer: a common English rule of thumb, so prompts are only ~N tokens."""
TARGET_STREAMS = 16


# ---- one request ---------------------------------------------------------------------------------


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


# ---- one level -----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class LevelResult:
    """One sweep point: the row of the CSV and of the README table."""

    server: str
    dtype: str
    mode: str
    level: float
    requests: int
    completed: int
    errors: int
    duration_s: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    mean_prompt_tokens: float | None
    mean_output_tokens: float | None
    short_outputs: int
    """Completed requests whose output length differs from max_tokens (should be 0 with ignore_eos)."""
    tokens_per_chunk: float | None
    """Above 1 when the server merges tokens into one chunk: ITL then counts gaps between chunks."""
    ttft_ms_p50: float | None = None
    ttft_ms_p90: float | None = None
    ttft_ms_p99: float | None = None
    itl_ms_p50: float | None = None
    itl_ms_p90: float | None = None
    itl_ms_p99: float | None = None
    e2e_ms_p50: float | None = None
    e2e_ms_p90: float | None = None
    e2e_ms_p99: float | None = None
    tpot_ms_mean: float | None = None
    """Per request (last token - first token) / (tokens - 1), averaged over requests."""
    server_tpot_ms: float | None = None
    """The server's own mean time per output token (usage chunk `timings`), averaged over requests."""
    server_step_ms: float | None = None
    """Mean engine step from a step-duration histogram on the server's /metrics, when it has one."""
    server_step_source: str | None = None
    server_steps: int | None = None
    error_samples: list[str] = field(default_factory=list)


def summarize(server: str, dtype: str, mode: str, level: float, results: list[RequestResult]) -> LevelResult:
    ok = [r for r in results if r.error is None]
    start = min((r.start for r in results), default=0.0)
    duration = max((r.end for r in results), default=0.0) - start
    tokens = sum(r.output_tokens for r in ok)
    chunks = sum(r.chunks for r in ok)
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    server_tpot = [r.server_tpot_ms for r in ok if r.server_tpot_ms is not None]
    tpot = [
        (r.last_token - r.start - r.ttft) / (r.output_tokens - 1)
        for r in ok
        if r.output_tokens > 1 and r.ttft
    ]
    row = LevelResult(
        server=server,
        dtype=dtype,
        mode=mode,
        level=level,
        requests=len(results),
        completed=len(ok),
        errors=len(results) - len(ok),
        duration_s=duration,
        output_tokens=tokens,
        output_tokens_per_s=tokens / duration if duration > 0 else 0.0,
        requests_per_s=len(ok) / duration if duration > 0 else 0.0,
        mean_prompt_tokens=sum(prompts) / len(prompts) if prompts else None,
        mean_output_tokens=tokens / len(ok) if ok else None,
        short_outputs=sum(r.output_tokens != r.expected_tokens for r in ok),
        tokens_per_chunk=tokens / chunks if chunks else None,
        tpot_ms_mean=1000 * sum(tpot) / len(tpot) if tpot else None,
        server_tpot_ms=sum(server_tpot) / len(server_tpot) if server_tpot else None,
        error_samples=sorted({r.error for r in results if r.error})[:5],
    )
    samples = {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "itl": [gap for r in ok for gap in r.itl],
        "e2e": [r.end - r.start for r in ok],
    }
    for name, values in samples.items():
        for q in PERCENTILES:
            p = percentile(values, q)
            setattr(row, f"{name}_ms_p{q}", None if p is None else 1000 * p)
    return row


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


# ---- prompts -------------------------------------------------------------------------------------


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


# ---- the server's own figures ----------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def step_histograms(text: str) -> dict[tuple[str, str], list[float]]:
    """Prometheus text → {(histogram name, labels): [sum, count]} for histograms about engine steps."""
    out: dict[tuple[str, str], list[float]] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or "step" not in m.group(1):
            continue
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        for suffix, slot in (("_sum", 0), ("_count", 1)):
            if name.endswith(suffix) and "seconds" in name:
                with contextlib.suppress(ValueError):
                    out.setdefault((name[: -len(suffix)], labels), [0.0, 0.0])[slot] = float(value)
    return out


def step_time(
    before: dict[tuple[str, str], list[float]], after: dict[tuple[str, str], list[float]]
) -> tuple[float | None, str | None]:
    """Mean step duration (ms) over a level from histogram deltas; a decode-only series if there is one."""
    deltas = {
        key: (a[0] - before.get(key, [0.0, 0.0])[0], a[1] - before.get(key, [0.0, 0.0])[1])
        for key, a in after.items()
    }
    usable = {k: v for k, v in deltas.items() if v[1] > 0}
    if not usable:
        return None, None
    key = next((k for k in usable if "decode" in k[0] + k[1]), None) or sorted(usable)[0]
    total, count = usable[key]
    return 1000 * total / count, f"/metrics {key[0]}{key[1]} (mean)"


async def server_state(client: httpx.AsyncClient) -> tuple[dict[tuple[str, str], list[float]], int | None]:
    hist: dict[tuple[str, str], list[float]] = {}
    steps = None
    with contextlib.suppress(httpx.HTTPError, ValueError):
        r = await client.get("/metrics")
        if r.status_code == 200:
            hist = step_histograms(r.text)
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
        r = await client.get("/stats")
        if r.status_code == 200:
            steps = int(r.json()["steps"])
    return hist, steps


# ---- a sweep against one server ------------------------------------------------------------------


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def accepts_token_ids(client: httpx.AsyncClient, model: str) -> bool:
    body = {"model": model, "prompt": [1, 2, 3], "max_tokens": 1, "temperature": 0}
    with contextlib.suppress(httpx.HTTPError):
        return (await client.post("/v1/completions", json=body)).status_code == 200
    return False


async def sweep(
    args: argparse.Namespace, url: str, server: str, dtype: str, tokenizer_dir: Path | None, deadline: float
) -> list[LevelResult]:
    """Warm up, then every level in turn (never overlapping), printing a line per level."""
    levels = args.request_rate or args.concurrency
    mode = "rate" if args.request_rate else "concurrency"
    widest = max(args.concurrency or [args.max_concurrency or 1024])  # open loop: never queue in the client
    timeout = httpx.Timeout(args.request_timeout, connect=30.0, pool=args.request_timeout)
    limits = httpx.Limits(max_connections=widest + 8, max_keepalive_connections=widest + 8)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rows = []
    async with httpx.AsyncClient(
        base_url=url, timeout=timeout, limits=limits, headers=headers, trust_env=False
    ) as client:
        model = args.served_model or (await client.get("/v1/models")).json()["data"][0]["id"]
        tokens = Tokens(tokenizer_dir, client)
        as_ids = args.prompt_format == "ids" or (
            args.prompt_format == "auto" and await accepts_token_ids(client, model)
        )
        warm = await make_prompts(args, tokens, args.warmup, args.seed + 999_999, as_ids)
        warm.max_tokens = [min(8, m) for m in warm.max_tokens]
        await asyncio.gather(*(stream_one(client, b) for b in request_bodies(args, model, warm)))
        for i, level in enumerate(levels):
            if time.monotonic() > deadline:
                print(f"  {server}: --max-total-seconds reached, skipping level {level}", file=sys.stderr)
                break
            count = args.num_requests or (max(8, 4 * int(level)) if mode == "concurrency" else 64)
            prompts = await make_prompts(args, tokens, count, args.seed + i, as_ids)
            bodies = request_bodies(args, model, prompts)
            before, steps_before = await server_state(client)
            if mode == "concurrency":
                results = await run_concurrency(client, bodies, int(level), args.max_level_seconds)
            else:
                results = await run_rate(
                    client, bodies, level, args.max_level_seconds, args.max_concurrency, args.seed + i
                )
            after, steps_after = await server_state(client)
            row = summarize(server, dtype, mode, level, results)
            row.server_step_ms, row.server_step_source = step_time(before, after)
            if steps_before is not None and steps_after is not None:
                row.server_steps = steps_after - steps_before
            rows.append(row)
            print_row(row, "ids" if as_ids else "text")
    return rows


# ---- launching servers ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched(command: list[str], ready_path: str, log_path: Path) -> Iterator[str]:
    """Run a server subprocess on a free loopback port until the block ends; yield its base URL."""
    port = free_port()
    command = [c.replace("{port}", str(port)) for c in command]
    url = f"http://127.0.0.1:{port}"
    print(f"starting {shlex.join(command)}", file=sys.stderr, flush=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise SystemExit(f"server exited with {proc.returncode}: {shlex.join(command)}\n{tail}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + ready_path, timeout=2, trust_env=False).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"server not ready after {START_TIMEOUT:.0f}s: {shlex.join(command)}")
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def our_command(args: argparse.Namespace, model: Path, dtype: str) -> list[str]:
    command = [sys.executable, "-m", "server", "--model", str(model), "--dtype", dtype]
    command += ["--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"]
    widest = max(args.concurrency or [args.max_concurrency or 0])
    if widest > 64:  # the server's default --max-num-seqs
        command += ["--max-num-seqs", str(widest)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    return command + [a for extra in args.server_arg for a in shlex.split(extra)]


def hf_command(args: argparse.Namespace, model: Path, dtype: str) -> list[str]:
    command = [sys.executable, str(ROOT / "bench" / "hf_server.py"), "--model", str(model), "--dtype", dtype]
    command += ["--host", "127.0.0.1", "--port", "{port}"]
    return command + (["--threads", str(args.threads)] if args.threads else [])


def build_random_110m(directory: Path) -> Path:
    """bench/engine.py's ~110M random checkpoint, built in a child process so this one never loads torch."""
    code = "import sys, pathlib, bench.engine as e; e.build_random_110m(pathlib.Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(directory)], cwd=ROOT, check=True)
    return directory


# ---- report --------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


COLUMNS = (
    "server",
    "dtype",
    "level",
    "done/err",
    "out tok/s",
    "req/s",
    "TTFT p50/p90/p99 ms",
    "ITL p50/p90/p99 ms",
    "E2E p50/p90/p99 s",
    "server ms/token, step",
)


def row_cells(r: LevelResult) -> list[str]:
    def trio(name: str, scale: float = 1.0, digits: int = 0) -> str:
        values = [getattr(r, f"{name}_ms_p{q}") for q in PERCENTILES]
        return " / ".join(fmt(v and v / scale, digits) for v in values)

    return [
        r.server,
        r.dtype,
        f"{r.level:g}",
        f"{r.completed}/{r.errors}",
        fmt(r.output_tokens_per_s),
        fmt(r.requests_per_s, 2),
        trio("ttft"),
        trio("itl", digits=1),
        trio("e2e", 1000, 2),
        f"{fmt(r.server_tpot_ms)}, {fmt(r.server_step_ms)}",
    ]


def print_row(r: LevelResult, prompt_form: str) -> None:
    extra = f", {r.short_outputs} outputs not of max_tokens" if r.short_outputs else ""
    errors = f", errors e.g. {r.error_samples[0]}" if r.error_samples else ""
    print(
        f"  {r.server} {r.dtype} {r.mode} {r.level:g}: {r.completed}/{r.requests} ok in {r.duration_s:.1f}s, "
        f"{r.output_tokens_per_s:.1f} tok/s, TTFT p50 {fmt(r.ttft_ms_p50, 0)} ms, ITL p50 "
        f"{fmt(r.itl_ms_p50)} ms p99 {fmt(r.itl_ms_p99)} ms ({prompt_form} prompts{extra}{errors})",
        file=sys.stderr,
        flush=True,
    )


def markdown_table(rows: list[LevelResult]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * 3 + "---:|" * (len(COLUMNS) - 3)]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def by_level(rows: list[LevelResult], server: str, dtype: str) -> dict[float, LevelResult]:
    return {r.level: r for r in rows if r.server == server and r.dtype == dtype and r.completed}


def comparisons(rows: list[LevelResult], dtypes: list[str]) -> list[dict[str, Any]]:
    """Ratios at each level both runs reached: ours/baseline throughput, baseline/ours TTFT p50, bf16/fp32."""
    ours = by_level(rows, "ours", dtypes[0])
    out = []
    for other, dtype in [("hf-baseline", dtypes[0])] + [("ours", d) for d in dtypes[1:]]:
        for level, theirs in by_level(rows, other, dtype).items():
            mine = ours.get(level)
            if not mine or not theirs.output_tokens_per_s:
                continue
            entry: dict[str, Any] = {"level": level, "vs": f"{other} {dtype}"}
            if other == "hf-baseline":
                entry["throughput_ours_over_baseline"] = mine.output_tokens_per_s / theirs.output_tokens_per_s
                if mine.ttft_ms_p50 and theirs.ttft_ms_p50:
                    entry["ttft_p50_baseline_over_ours"] = theirs.ttft_ms_p50 / mine.ttft_ms_p50
            else:
                entry[f"throughput_{dtype}_over_{dtypes[0]}"] = (
                    theirs.output_tokens_per_s / mine.output_tokens_per_s
                )
            out.append(entry)
    return out


def targets(rows: list[LevelResult], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The issue's targets at 16 and 1 streams: PASS, MISS, or n/a when this run did not measure it."""
    primary, n = args.dtypes[0], TARGET_STREAMS
    closed = [r for r in rows if r.mode == "concurrency"]
    ours = by_level(closed, "target" if args.base_url else "ours", primary)
    r16, r1 = ours.get(n), ours.get(1)
    h16 = by_level(closed, "hf-baseline", primary).get(n)
    b16 = by_level(closed, "ours", "bfloat16").get(n) if primary == "float32" else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    tps, ttft = r16 and r16.output_tokens_per_s, r16 and r16.ttft_ms_p50
    # The engine's decode step, best first: measured without HTTP (bench/http_overhead.py), the server's
    # own time per output token (decode steps only), the mean of its step histogram (prefills included).
    step, source = args.engine_step_ms, "--engine-step-ms"
    if step is None and r1:
        step, source = r1.server_tpot_ms, "the server's usage timings"
        if step is None:
            step, source = r1.server_step_ms, r1.server_step_source
    spread = ratio(r16 and r16.itl_ms_p99, r16 and r16.itl_ms_p50)
    itl1 = ratio(r1 and r1.itl_ms_p50, step)
    thr, lat = ratio(tps, h16 and h16.output_tokens_per_s), ratio(h16 and h16.ttft_ms_p50, ttft)
    bf = ratio(b16 and b16.output_tokens_per_s, tps)
    need16 = f"needs a --concurrency level of {n}"
    checks = [  # (target, measured, passes, shown, why it may be missing)
        (f"{n} streams: output >= 600 tok/s", tps, tps and tps >= 600, f"{fmt(tps)} tok/s", need16),
        (f"{n} streams: TTFT p50 <= 1 s", ttft, ttft and ttft <= 1000, f"{fmt(ttft, 0)} ms", need16),
        (f"{n} streams: ITL p99 <= 3x ITL p50", spread, spread and spread <= 3,
         f"{fmt(spread, 2)}x ({fmt(r16 and r16.itl_ms_p99)} / {fmt(r16 and r16.itl_ms_p50)} ms)", need16),
        ("1 stream: ITL p50 within 10% of the engine's step", itl1, itl1 and abs(itl1 - 1) <= 0.1,
         f"{fmt(itl1, 3)}x ({fmt(r1 and r1.itl_ms_p50, 2)} vs {fmt(step, 2)} ms from {source})",
         "needs a --concurrency level of 1 and the step time (server /metrics or usage timings, or "
         "--engine-step-ms from bench/http_overhead.py)"),
        (f"{n} streams: >= 10x the transformers baseline's throughput", thr, thr and thr >= 10,
         f"{fmt(thr, 1)}x ({fmt(tps)} vs {fmt(h16 and h16.output_tokens_per_s)} tok/s)",
         f"needs --compare-hf and {need16[6:]}"),
        (f"{n} streams: >= 10x lower TTFT p50 than the baseline", lat, lat and lat >= 10,
         f"{fmt(lat, 1)}x ({fmt(h16 and h16.ttft_ms_p50, 0)} vs {fmt(ttft, 0)} ms)",
         f"needs --compare-hf and {need16[6:]}"),
        (f"{n} streams: bfloat16 >= 2x float32 throughput", bf, bf and bf >= 2,
         f"{fmt(bf, 2)}x ({fmt(b16 and b16.output_tokens_per_s)} vs {fmt(tps)} tok/s)",
         f"needs --dtypes float32,bfloat16 and {need16[6:]}"),
    ]  # fmt: skip
    return [
        {"target": name, "status": "n/a" if value is None else "PASS" if passes else "MISS",
         "measured": value, "shown": shown if value is not None else why}
        for name, value, passes, shown, why in checks
    ]  # fmt: skip


def plot(rows: list[LevelResult], prefix: Path, mode: str, title: str) -> list[Path]:
    """Throughput vs level, and TTFT/ITL percentiles vs level: one colour per server and dtype."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plots", file=sys.stderr)
        return []
    xlabel = "concurrent streams" if mode == "concurrency" else "offered request rate (req/s)"
    runs = list(dict.fromkeys((r.server, r.dtype) for r in rows))  # ours first, as swept
    levels = sorted({r.level for r in rows})
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    # Minor ticks of a log axis: label 2x and 5x only, or they collide.
    sparse = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "25" else "")

    def series(run: tuple[str, str], attr: str) -> list[tuple[float, float]]:
        mine = [r for r in rows if (r.server, r.dtype) == run and r.completed]
        return sorted((r.level, getattr(r, attr)) for r in mine if getattr(r, attr) is not None)

    def axes_style(ax: Any, ylabel: str, log_y: bool) -> None:
        ax.set(xscale="log", yscale="log" if log_y else "linear", xlabel=xlabel, ylabel=ylabel)
        ax.set_xticks(levels, [f"{v:g}" for v in levels])
        ax.xaxis.set_minor_formatter(NullFormatter())
        if log_y:
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(sparse)
            ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(True, which="both", alpha=0.3)

    paths = [
        prefix.with_name(prefix.name + "-throughput.png"),
        prefix.with_name(prefix.name + "-latency.png"),
    ]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, run in enumerate(runs):
        ax.plot(*zip(*series(run, "output_tokens_per_s"), strict=True), "o-", color=f"C{i}",
                label=f"{run[0]} ({run[1]})")  # fmt: skip
    axes_style(ax, "output tokens/s", log_y=False)
    ax.set_ylim(bottom=0)
    ax.set_title(f"Throughput: {title}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, metric, label in ((axes[0], "ttft", "time to first token (ms)"),
                              (axes[1], "itl", "inter-token latency (ms)")):  # fmt: skip
        for i, run in enumerate(runs):
            for q, style in zip(PERCENTILES, ("o-", "s--", "^:"), strict=True):
                if pts := series(run, f"{metric}_ms_p{q}"):
                    ax.plot(*zip(*pts, strict=True), style, color=f"C{i}", label=f"{run[0]} {run[1]} p{q}")
        axes_style(ax, label, log_y=True)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(runs), fontsize=7)
    fig.suptitle(f"Latency percentiles (p50 solid, p90 dashed, p99 dotted): {title}", fontsize=10)
    fig.tight_layout(rect=(0, 0.04 * len(PERCENTILES), 1, 1))
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("torch", "transformers", "httpx"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **versions,
        "git_commit": commit.stdout.strip() or None,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_outputs(args: argparse.Namespace, rows: list[LevelResult], report: dict[str, Any]) -> list[Path]:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    prefix = args.out_dir / args.tag
    paths = [prefix.with_name(f"{prefix.name}.{ext}") for ext in ("json", "csv", "md")]
    paths[0].write_text(json.dumps(report, indent=2, default=str) + "\n")
    names = [f.name for f in fields(LevelResult) if f.name != "error_samples"]
    with paths[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    pngs = plot(rows, prefix, report["config"]["mode"], report["config"]["title"])
    m = report["machine"]
    busy = m["load_average_at_start"][0] > 0.5 * m["usable_cpus"]
    md = [
        f"### {report['config']['title']}",
        "",
        f"Machine: {m['cpu']}, {m['usable_cpus']} CPUs usable (load average at start "
        f"{m['load_average_at_start'][0]:.1f}); torch {m.get('torch', '?')}, transformers "
        f"{m.get('transformers', '?')}; commit {m['git_commit']}, {m['date']}.",
        "",
        f"```sh\n{report['command']}\n```",
        "",
    ]
    if busy:
        md += ["**Noisy**: other work was running on this machine; take these numbers as a dry run.", ""]
    md += [markdown_table(rows), ""]
    if report["comparison"]:
        md += ["| level | compared with | ratio |", "|---:|---|---:|"]
        for c in report["comparison"]:
            for key, value in c.items():
                if key not in ("level", "vs"):
                    md.append(f"| {c['level']:g} | {c['vs']} | {key} = {value:.2f} |")
        md.append("")
    md += ["| target | status | measured |", "|---|---|---|"]
    md += [f"| {t['target']} | {t['status']} | {t['shown']} |" for t in report["targets"]]
    md += [""] + [f"![{p.stem}]({p.name})" for p in pngs]
    paths[2].write_text("\n".join(md) + "\n")
    return paths + pngs


# ---- driver --------------------------------------------------------------------------------------


def number_list(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if not values or min(values) <= 0:
            raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
        return values

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--base-url", help="an already running OpenAI-compatible server, e.g. http://127.0.0.1:8000"
    )
    src.add_argument("--model", type=Path, help="start our server (python -m server) on this checkpoint")
    src.add_argument(
        "--random-110m",
        action="store_true",
        help="start our server on bench/engine.py's ~110M "
        "random model (hidden 768, 12 layers, 12/4 heads, vocab 32000)",
    )
    p.add_argument("--allow-remote", action="store_true", help="allow a --base-url that is not loopback")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="sent as a Bearer token")
    p.add_argument("--served-model", help="model id to send (default: the first of GET /v1/models)")
    p.add_argument(
        "--tokenizer",
        type=Path,
        help="checkpoint dir whose tokenizer.json builds the prompts "
        "(default: the --model's; else the server's /tokenize)",
    )
    load = p.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency",
        type=number_list(int),
        default=None,
        help="closed-loop levels: concurrent streams (default 1,2,4,8,16)",
    )
    load.add_argument("--request-rate", type=number_list(float), help="open-loop levels: Poisson req/s")
    p.add_argument("--max-concurrency", type=int, help="with --request-rate: most requests in flight")
    p.add_argument(
        "--num-requests", type=int, help="per level (default: max(8, 4 x concurrency); 64 per rate)"
    )
    p.add_argument("--max-level-seconds", type=float, default=300.0, help="stop sending new requests after")
    p.add_argument("--max-total-seconds", type=float, default=3600.0, help="skip the levels left after")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--warmup", type=int, default=2, help="short requests before each server's sweep")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=128, help="max_tokens, with ignore_eos")
    p.add_argument("--range-ratio", type=float, default=0.0, help="prompt lengths uniform in N·(1±ratio)")
    p.add_argument("--output-range-ratio", type=float, default=0.0, help="output lengths likewise")
    p.add_argument("--prompt-file", type=Path, help="cut prompts from this text instead of random token ids")
    p.add_argument(
        "--prompt-format",
        choices=("auto", "ids", "text"),
        default="auto",
        help="send token ids (auto: when the server accepts them) or text",
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--no-logprobs",
        dest="logprobs",
        action="store_false",
        help="do not ask for logprobs: 0 (with it every token is its own chunk even when a "
        "split UTF-8 character or a special token has no text yet)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtypes",
        type=lambda s: s.split(","),
        default=["float32"],
        help="our server's dtypes, one sweep each (the first is the baseline's)",
    )
    p.add_argument("--threads", type=int, help="torch threads for the servers we start")
    p.add_argument("--server-arg", action="append", default=[], help="extra flags for python -m server")
    p.add_argument("--compare-hf", action="store_true", help="also sweep bench/hf_server.py (same weights)")
    p.add_argument("--engine-step-ms", type=float, help="the engine's own 1-stream step time, for the target")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--tag", help="output file stem (default: serve-<model>)")
    args = p.parse_args(argv)
    if args.request_rate is None and args.concurrency is None:
        args.concurrency = [1, 2, 4, 8, 16]
    if args.base_url:
        if not is_loopback(args.base_url) and not args.allow_remote:
            p.error(f"{args.base_url} is not a loopback address; pass --allow-remote to benchmark it anyway")
        if args.compare_hf or args.dtypes != ["float32"] or args.threads or args.server_arg:
            p.error("--compare-hf, --dtypes, --threads and --server-arg need --model or --random-110m")
        args.dtypes = ["server"]
    elif args.model and not (args.model / "config.json").is_file():
        p.error(f"{args.model} is not a checkpoint directory (no config.json)")
    for d in args.dtypes if not args.base_url else []:
        if d not in ("float32", "bfloat16", "float16"):
            p.error(f"--dtypes: unknown dtype {d!r}")
    if min(args.prompt_tokens, args.output_tokens, args.warmup + 1) < 1 or args.num_requests == 0:
        p.error("--prompt-tokens, --output-tokens and --num-requests must be positive")
    if args.prompt_file and not args.prompt_file.is_file():
        p.error(f"--prompt-file {args.prompt_file}: no such file")
    if not 0 <= args.range_ratio < 1 or not 0 <= args.output_range_ratio < 1:
        p.error("range ratios must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.max_total_seconds
    info = machine()
    if info["load_average_at_start"][0] > 0.5 * info["usable_cpus"]:
        print(
            f"warning: load average {info['load_average_at_start'][0]:.1f} on {info['usable_cpus']} CPUs: "
            "other work shares this machine, expect noisy figures",
            file=sys.stderr,
        )
    rows: list[LevelResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        if args.base_url:
            name = args.served_model or urlsplit(args.base_url).netloc
            rows += asyncio.run(
                sweep(args, args.base_url.rstrip("/"), "target", "server", args.tokenizer, deadline)
            )
        else:
            model = build_random_110m(Path(tmp) / "random-110m") if args.random_110m else args.model
            name = "random-110m" if args.random_110m else model.resolve().name
            tok_dir = args.tokenizer or model
            runs = [("ours", d, our_command(args, model, d), "/ready") for d in args.dtypes]
            if args.compare_hf:
                runs.append(
                    ("hf-baseline", args.dtypes[0], hf_command(args, model, args.dtypes[0]), "/health")
                )
            for server, dtype, command, ready in runs:
                if time.monotonic() > deadline:
                    break
                with launched(command, ready, Path(tmp) / f"{server}-{dtype}.log") as url:
                    rows += asyncio.run(sweep(args, url, server, dtype, tok_dir, deadline))
    args.tag = args.tag or f"serve-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"
    mode = "rate" if args.request_rate else "concurrency"
    title = f"{name}, prompt {args.prompt_tokens}, output {args.output_tokens} tokens" + (
        f", {args.threads} threads" if args.threads else ""
    )
    given = list(sys.argv[1:] if argv is None else argv)
    given = ["***" if i and given[i - 1] == "--api-key" else a for i, a in enumerate(given)]
    config = {k: v for k, v in vars(args).items() if k != "api_key"}
    report = {
        "command": shlex.join([".venv/bin/python", "bench/serve.py", *given]),
        "machine": info,
        "config": config | {"mode": mode, "title": title, "model_name": name},
        "results": [asdict(r) for r in rows],
        "comparison": comparisons(rows, args.dtypes),
        "targets": targets(rows, args),
    }
    print("\n" + markdown_table(rows))
    for c in report["comparison"]:
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in c.items() if k not in ("level", "vs"))
        print(f"level {c['level']:g} vs {c['vs']}: {ratios}")
    print("\ntargets (2-core CPU, ~110M, float32, prompt 128, output 128):")
    for t in report["targets"]:
        print(f"  {t['status']:>4}  {t['target']}: {t['shown']}")
    for path in write_outputs(args, rows, report):
        print(f"wrote {path}")
    return 0 if rows and all(r.errors == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
