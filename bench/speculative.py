"""Decode tokens/s with and without speculative decoding (ngram), in one run, on the same prompts.

Workloads: `code`, completions of prompts cut from held-out standard-library files (the files the
shipped model's training set left out, chosen by the trainer's own hash split); `text`, free prose
(the README's paragraphs); `text-sampled`, the same prose sampled at temperature 1 with a seed per
request, where proposals mostly fail (the greedy shipped model falls into loops that n-grams predict);
`chat`, questions under a chat model's template (only with --chat-model). For each: single-stream
decode tokens/s (one request at a time), and total tokens/s with --streams requests at once. Greedy
outputs with and without speculation are compared token for token (they must be equal; sampled ones
need only follow the same distribution), and the acceptance counters printed.

    .venv/bin/python -m bench.speculative --model weights/default --prompts 8 --max-tokens 128
    .venv/bin/python -m bench.speculative --speculative-model DRAFT_DIR --chat-model DIR --json out.json

The chat model (--chat-model) is measured with the ngram proposer only (a draft must share its
tokenizer, so --speculative-model applies to --model).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from bench.harness import ROOT
from model.data import read_corpus, split_documents
from model.tokenizer import Tokenizer
from server.engine.config import EngineConfig
from server.engine.core import LLMEngine
from server.engine.outputs import Delta, Timings
from server.engine.params import SamplingParams
from server.engine.sequence import Request

VAL_FRACTION = 0.05
"""The shipped model's held-out share (model/train.py's default preset)."""
QUESTIONS = (
    "Write a Python function that reverses a linked list.",
    "Explain what a context manager is, with an example.",
    "How do I read a CSV file and sum one column?",
    "Write a class for a bank account with deposit and withdraw methods.",
    "What is the difference between a list and a tuple?",
    "Write a function that checks whether a string is a palindrome.",
    "Show how to use argparse with two options.",
    "Write a recursive function for the Fibonacci numbers, then an iterative one.",
)


def code_prompts(tokenizer: Tokenizer, count: int, tokens: int, seed: int) -> list[list[int]]:
    """The `tokens` tokens before a random line start of `count` held-out stdlib files."""
    _, held_out = split_documents(read_corpus(None), VAL_FRACTION)
    rng = random.Random(seed)
    prompts = []
    for doc in rng.sample(held_out, len(held_out)):
        ids = tokenizer.encode(doc.text)
        if len(ids) < tokens + 64:
            continue
        cut = rng.randrange(tokens, len(ids) - 32)
        prompts.append(ids[cut - tokens : cut])
        if len(prompts) == count:
            break
    return prompts


def text_prompts(tokenizer: Tokenizer, count: int, tokens: int) -> list[list[int]]:
    """README prose: paragraphs outside code blocks and tables, up to `tokens` tokens each."""
    text = re.sub(r"```.*?```", "", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    paragraphs = [p for p in text.split("\n\n") if len(p) > 300 and not p.lstrip().startswith(("|", "#"))]
    return [tokenizer.encode(p)[:tokens] for p in paragraphs[:count]]


def chat_prompts(tokenizer: Tokenizer, count: int) -> list[list[int]]:
    return [
        tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}]))
        for q in QUESTIONS[:count]
    ]


@dataclass
class Run:
    tokens: list[list[int]]
    decode_seconds: list[float]
    """Per request: first token to last (what decoding, not prefill, took)."""
    wall_seconds: float


def generate(
    engine: LLMEngine,
    prompts: list[list[int]],
    max_tokens: int,
    together: bool,
    temperature: float = 0.0,
    first_seed: int = 0,
) -> Run:
    """Completions (greedy, or sampled with seed first_seed + i for prompt i), one request at a time or
    all at once."""

    def params(i: int) -> SamplingParams:
        seed = i if temperature else None
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, ignore_eos=True)

    outputs: list[list[int]] = []
    timings: list[Timings] = []
    start = time.perf_counter()
    numbered = list(enumerate(prompts, start=first_seed))
    for group in [numbered] if together else [[p] for p in numbered]:
        requests = [
            Request("bench", p, sp, engine.validate(p, sp), None, Timings(time.monotonic()))
            for p, sp in ((p, params(i)) for i, p in group)
        ]
        tokens: dict[int, list[int]] = {id(r): [] for r in requests}
        for request in requests:
            engine.add(request)
            timings.append(request.timings)
        while engine.has_work:
            for request, item in engine.step():
                if isinstance(item, Delta):
                    tokens[id(request)].extend(item.token_ids)
        outputs += [tokens[id(r)] for r in requests]
    wall = time.perf_counter() - start
    decode = [(t.token_times[-1] - t.token_times[0]) for t in timings]
    return Run(outputs, decode, wall)


def measure(
    engines: dict[str, LLMEngine],
    prompts: list[list[int]],
    max_tokens: int,
    streams: int,
    temperature: float = 0.0,
) -> dict[str, object]:
    """Single-stream and `streams`-at-once figures of each engine on `prompts`.

    Single streams take turns, prompt by prompt (every engine on prompt 1, then on prompt 2, ...), so
    that a machine whose speed drifts during the run slows every engine alike.
    """
    before = {name: engine.stats() for name, engine in engines.items()}
    alone: dict[str, list[Run]] = {name: [] for name in engines}
    for i, prompt in enumerate(prompts):
        for name, engine in engines.items():
            alone[name].append(generate(engine, [prompt], max_tokens, False, temperature, first_seed=i))
    out: dict[str, object] = {}
    for name, engine in engines.items():
        after = engine.stats()
        batch = generate(
            engine, (prompts * streams)[:streams], max_tokens, together=True, temperature=temperature
        )
        tokens = [run.tokens[0] for run in alone[name]]
        seconds = [run.decode_seconds[0] for run in alone[name]]
        decoded = [len(t) - 1 for t in tokens]
        out[name] = {
            "single_stream_tokens_per_s": sum(decoded) / sum(seconds),
            "single_stream_median_tokens_per_s": statistics.median(
                n / s for n, s in zip(decoded, seconds, strict=True)
            ),
            f"{streams}_streams_tokens_per_s": sum(map(len, batch.tokens)) / batch.wall_seconds,
            "drafts": after.spec_drafts - before[name].spec_drafts,
            "draft_tokens": after.spec_draft_tokens - before[name].spec_draft_tokens,
            "accepted_tokens": after.spec_accepted_tokens - before[name].spec_accepted_tokens,
            "outputs": tokens,
        }
    outputs = [r.pop("outputs") for r in out.values()]  # type: ignore[attr-defined]
    out["identical"] = all(o == outputs[0] for o in outputs) if not temperature else None
    return out


def engines_for(model: Path, args: argparse.Namespace, draft: Path | None) -> dict[str, LLMEngine]:
    """The plain engine and one per proposer asked for, on the same model and settings."""
    common = {
        "model": model,
        "num_threads": args.threads,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "enforce_eager": args.enforce_eager,
    }
    ngram = {"prompt_lookup_min": args.prompt_lookup_min, "prompt_lookup_max": args.prompt_lookup_max}
    methods = {"ngram": ngram}
    if draft is not None:
        methods["draft"] = {"speculative_model": draft}
    engines = {"plain": LLMEngine(EngineConfig(**common))}
    for method, flags in methods.items():
        engines[method] = LLMEngine(
            EngineConfig(
                **common,
                speculative_method=method,
                num_speculative_tokens=args.num_speculative_tokens,
                **flags,  # type: ignore[arg-type]
            )
        )
    return engines


SAME_OUTPUT = {True: "yes", False: "NO", None: "n/a (sampled)"}


def report(name: str, result: dict[str, object], streams: int) -> list[str]:
    """A table row per proposer: its figures against the plain engine's."""
    plain = result["plain"]
    assert isinstance(plain, dict)
    one, many = "single_stream_tokens_per_s", f"{streams}_streams_tokens_per_s"
    rows = []
    for method, spec in result.items():
        if method in ("plain", "identical"):
            continue
        assert isinstance(spec, dict)
        rate = spec["accepted_tokens"] / spec["draft_tokens"] if spec["draft_tokens"] else 0.0
        rows.append(
            f"| {name} | {method} | {plain[one]:.1f} | {spec[one]:.1f} | {spec[one] / plain[one]:.2f}x | "
            f"{plain[many]:.1f} | {spec[many]:.1f} | {spec[many] / plain[many]:.2f}x | {spec['drafts']} | "
            f"{rate:.0%} | {SAME_OUTPUT[result['identical']]} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("weights/default"))
    parser.add_argument("--chat-model", type=Path, default=None, help="also measure this chat model")
    parser.add_argument(
        "--speculative-model", type=Path, default=None, help="also measure this draft model (same tokenizer)"
    )
    parser.add_argument("--prompts", type=int, default=8, help="prompts per workload")
    parser.add_argument("--prompt-tokens", type=int, default=384)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--streams", type=int, default=16, help="requests at once for the throughput check")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--num-speculative-tokens", type=int, default=EngineConfig.num_speculative_tokens)
    parser.add_argument("--prompt-lookup-min", type=int, default=EngineConfig.prompt_lookup_min)
    parser.add_argument("--prompt-lookup-max", type=int, default=EngineConfig.prompt_lookup_max)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--enforce-eager", action="store_true", help="no compiled decode steps (smoke runs)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    results: dict[str, dict[str, object]] = {}
    tokenizer = Tokenizer.load(args.model)
    engines = engines_for(args.model, args, args.speculative_model)
    text = text_prompts(tokenizer, args.prompts, args.prompt_tokens)
    workloads = {  # name: (prompts, temperature)
        "code": (code_prompts(tokenizer, args.prompts, args.prompt_tokens, args.seed), 0.0),
        "text": (text, 0.0),
        "text-sampled": (text, 1.0),
    }
    for engine in engines.values():
        generate(engine, text[:1], 4, together=False)  # warm-up
    for name, (prompts, temperature) in workloads.items():
        results[name] = measure(engines, prompts, args.max_tokens, args.streams, temperature)
    if args.chat_model is not None:
        chat = engines_for(args.chat_model, args, None)
        prompts = chat_prompts(Tokenizer.load(args.chat_model), args.prompts)
        results["chat"] = measure(chat, prompts, args.max_tokens, args.streams)

    print(
        f"model {args.model}; {args.prompts} prompts per workload, {args.max_tokens} tokens each; "
        f"k={args.num_speculative_tokens}, n-grams {args.prompt_lookup_min}-{args.prompt_lookup_max}, "
        f"draft model {args.speculative_model}"
    )
    print(
        f"| workload | proposer | 1 stream plain tok/s | 1 stream spec tok/s | speed-up | {args.streams} "
        f"streams plain tok/s | {args.streams} streams spec tok/s | ratio | drafts | accepted | same output |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        print("\n".join(report(name, result, args.streams)))
    if args.json is not None:
        payload = {"config": vars(args), "results": results}
        args.json.write_text(json.dumps(payload, default=str, indent=2))


if __name__ == "__main__":
    main()
