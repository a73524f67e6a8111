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
    .venv/bin/python -m bench.serve --base-url http://127.0.0.1:8000 --concurrency 1,4,16
    # start our server (and, with --compare-hf, the naive transformers baseline) on free loopback ports
    .venv/bin/python -m bench.serve --random-110m --threads 2 --dtypes float32,bfloat16 --compare-hf
    # int8 weights beside bfloat16, one stream
    .venv/bin/python -m bench.serve --random-110m --threads 2 --dtypes bfloat16,bfloat16+int8 --concurrency 1

Every level is bounded by --num-requests and --max-level-seconds, every request by --request-timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from bench.harness import ROOT, is_loopback
from bench.serve.launch import build_random_110m, start_hf, start_ours
from bench.serve.load import Tokens, make_prompts, request_bodies, run_concurrency, run_rate, stream_one
from bench.serve.report import comparisons, machine, markdown_table, print_row, targets, write_outputs
from bench.serve.stats import LevelResult, server_state, step_time, summarize


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
        help="our server's dtypes, one sweep each (the first is the baseline's); DTYPE+int8 also quantizes "
        "the weights (--quantization int8), e.g. bfloat16,bfloat16+int8",
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
        dtype, _, quantization = d.partition("+")
        if dtype not in ("float32", "bfloat16", "float16") or quantization not in ("", "int8"):
            p.error(f"--dtypes: unknown dtype {d!r}")
    if args.compare_hf and "+" in args.dtypes[0]:
        p.error("--compare-hf: the first of --dtypes is the baseline's, which cannot be quantized")
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
            runs = [("ours", d) for d in args.dtypes]
            if args.compare_hf:
                runs.append(("hf-baseline", args.dtypes[0]))
            for server, dtype in runs:
                if time.monotonic() > deadline:
                    break
                log = Path(tmp) / f"{server}-{dtype}.log"
                if server == "ours":
                    running = start_ours(args, model, dtype, log)
                else:
                    running = start_hf(model, dtype, args.threads, log)
                with running:
                    rows += asyncio.run(sweep(args, running.url, server, dtype, tok_dir, deadline))
    args.tag = args.tag or f"serve-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"
    mode = "rate" if args.request_rate else "concurrency"
    title = f"{name}, prompt {args.prompt_tokens}, output {args.output_tokens} tokens" + (
        f", {args.threads} threads" if args.threads else ""
    )
    given = list(sys.argv[1:] if argv is None else argv)
    given = ["***" if i and given[i - 1] == "--api-key" else a for i, a in enumerate(given)]
    config = {k: v for k, v in vars(args).items() if k != "api_key"}
    report = {
        "command": shlex.join([".venv/bin/python", "-m", "bench.serve", *given]),
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
