"""What the HTTP layer costs: per-token latency and throughput through HTTP vs the engine alone.

Same weights, same engine flags, same prompts (random token ids, so tokenization is not measured),
greedy, `ignore_eos`, a fixed number of new tokens, at 1 and 16 concurrent streams (`--streams`).
Both ask for `logprobs: 0` (the sampled token's logprob only): then every token is an event even
while the detokenizer holds back bytes of a split character, as random weights produce constantly.

- engine: an in-process AsyncEngine; N concurrent `submit()` streams read on its event loop;
- http: `python -m server` as a subprocess on 127.0.0.1; N concurrent streaming /v1/completions
  read with httpx (SSE parsed and JSON decoded, as a real client does).

The two runs take turns, never overlap. Per stream, ms/token is (last token - first token) / (tokens - 1);
tokens/s is all streams' tokens over the wall time from the first request to the last token; TTFT is
from the request to its first token. The figures are medians over `--repeats` runs. On a small machine
the HTTP client shares the CPU with the server, so "http" includes the client's own cost, as in real use.

    .venv/bin/python -m bench.http_overhead --model weights/default --threads 2
    .venv/bin/python -m bench.http_overhead --random-110m --streams 1,16 --new-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.harness import launch
from bench.serve.launch import build_random_110m
from model.tokenizer import Tokenizer
from server.engine.outputs import Delta
from server.engine.params import SamplingParams
from server.settings import parse_settings


@dataclass
class Run:
    """One measurement: N streams started together."""

    tokens_per_s: float
    ms_per_token: float
    ttft_ms: float


@dataclass
class Stream:
    start: float
    times: list[float]
    tokens: int

    def ms_per_token(self) -> float | None:
        if self.tokens < 2 or len(self.times) < 2:
            return None
        return 1000 * (self.times[-1] - self.times[0]) / (self.tokens - 1)


def summarize(start: float, streams: list[Stream]) -> Run:
    end = max(s.times[-1] for s in streams)
    per_token = [v for s in streams if (v := s.ms_per_token()) is not None]
    return Run(
        tokens_per_s=sum(s.tokens for s in streams) / (end - start),
        ms_per_token=statistics.mean(per_token) if per_token else float("nan"),
        ttft_ms=statistics.mean(1000 * (s.times[0] - s.start) for s in streams),
    )


def prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Distinct random prompts (no shared prefix, so prefix caching does not flatter either side)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


# ---- engine alone ----------------------------------------------------------------------------


async def engine_run(engine: Any, batch: list[list[int]], new_tokens: int, tag: str) -> Run:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    start = time.perf_counter()

    async def one(i: int, ids: list[int]) -> Stream:
        stream = engine.submit(ids, params, f"{tag}-{i}")
        out = Stream(start, [], 0)
        async for event in stream:
            if isinstance(event, Delta):
                out.times.append(time.perf_counter())
                out.tokens += len(event.token_ids)
        return out

    return summarize(start, list(await asyncio.gather(*(one(i, p) for i, p in enumerate(batch)))))


async def engine_bench(args: argparse.Namespace, model: Path) -> dict[int, list[Run]]:
    from server.engine.async_engine import AsyncEngine

    engine = AsyncEngine(parse_settings(["--model", str(model), *engine_flags(args)], env={}).engine_config())
    engine.start()
    vocab = engine.tokenizer.vocab_size
    results: dict[int, list[Run]] = {}
    try:
        await engine_run(engine, prompts(2, args.prompt_tokens, vocab, 99), 8, "warmup")
        for n in args.streams:
            results[n] = [
                await engine_run(
                    engine, prompts(n, args.prompt_tokens, vocab, r), args.new_tokens, f"e{n}-{r}"
                )
                for r in range(args.repeats)
            ]
    finally:
        engine.shutdown()
    return results


# ---- through HTTP ----------------------------------------------------------------------------


async def http_run(client: httpx.AsyncClient, model: str, batch: list[list[int]], new_tokens: int) -> Run:
    start = time.perf_counter()

    async def one(ids: list[int]) -> Stream:
        body = {
            "model": model, "prompt": ids, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
        out = Stream(time.perf_counter(), [], 0)
        async with client.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    out.times.append(time.perf_counter())
                elif chunk.get("usage"):
                    out.tokens = chunk["usage"]["completion_tokens"]
        return out

    return summarize(start, list(await asyncio.gather(*(one(p) for p in batch))))


async def http_bench(args: argparse.Namespace, model: Path, log_path: Path) -> dict[int, list[Run]]:
    results: dict[int, list[Run]] = {}
    with launch(model, log_path, *engine_flags(args)) as server:
        limits = httpx.Limits(max_connections=max(args.streams) + 4)
        async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client:
            served = (await client.get("/v1/models")).json()["data"][0]["id"]
            vocab = Tokenizer.load(model).vocab_size
            await http_run(client, served, prompts(2, args.prompt_tokens, vocab, 99), 8)
            for n in args.streams:
                results[n] = [
                    await http_run(client, served, prompts(n, args.prompt_tokens, vocab, r), args.new_tokens)
                    for r in range(args.repeats)
                ]
    return results


# ---- report ----------------------------------------------------------------------------------


def engine_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--max-num-seqs", str(max(max(args.streams), 16)), "--device", args.device]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    if args.dtype:
        flags += ["--dtype", args.dtype]
    if args.enforce_eager:
        flags.append("--enforce-eager")
    return flags


def median_run(runs: list[Run]) -> Run:
    return Run(
        tokens_per_s=statistics.median(r.tokens_per_s for r in runs),
        ms_per_token=statistics.median(r.ms_per_token for r in runs),
        ttft_ms=statistics.median(r.ttft_ms for r in runs),
    )


def report(engine: dict[int, list[Run]], http: dict[int, list[Run]]) -> list[dict[str, Any]]:
    header = (
        f"{'streams':>7} | {'engine tok/s':>12} {'http tok/s':>10} {'ratio':>6} | "
        f"{'engine ms/tok':>13} {'http ms/tok':>11} {'ratio':>6} | {'engine TTFT':>11} {'http TTFT':>9}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for n in engine:
        e, h = median_run(engine[n]), median_run(http[n])
        throughput_ratio = e.tokens_per_s / h.tokens_per_s
        latency_ratio = h.ms_per_token / e.ms_per_token
        print(
            f"{n:>7} | {e.tokens_per_s:>12.1f} {h.tokens_per_s:>10.1f} {throughput_ratio:>6.2f} | "
            f"{e.ms_per_token:>13.2f} {h.ms_per_token:>11.2f} {latency_ratio:>6.2f} | "
            f"{e.ttft_ms:>9.1f}ms {h.ttft_ms:>7.1f}ms"
        )
        rows.append({"streams": n, "engine": asdict(e), "http": asdict(h),
                     "throughput_ratio": throughput_ratio, "latency_ratio": latency_ratio})  # fmt: skip
    print("ratio: engine tok/s over http tok/s, and http ms/token over engine ms/token (1.00 = no overhead)")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=Path("weights/default"), help="checkpoint directory")
    source.add_argument("--random-110m", action="store_true", help="build a ~110M random model in a temp dir")
    p.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads, for both runs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--enforce-eager", action="store_true", help="no compiled decode steps (quick smoke runs)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if not args.random_110m and not (args.model / "config.json").is_file():
        p.error(f"{args.model} is not a checkpoint directory: pass --model DIR or --random-110m")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        # Built in a child process: this one's main thread must run no torch parallel region, or the
        # in-process engine pays for a second OpenMP pool (see server/engine/async_engine.py).
        model = build_random_110m(Path(tmp) / "random-110m") if args.random_110m else args.model
        engine = asyncio.run(engine_bench(args, model))
        http = asyncio.run(http_bench(args, model, Path(tmp) / "server.log"))
    name = "random-110m" if args.random_110m else model.name
    print(f"model {name}, {args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens, "
          f"median of {args.repeats}, {os.cpu_count()} CPUs")  # fmt: skip
    rows = report(engine, http)
    if args.json:
        args.json.write_text(json.dumps({"config": vars(args) | {"model": str(model)}, "results": rows},
                                        indent=2, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
