"""What structured output costs: decode tokens/s with every row under a JSON Schema vs every row free,
and the time to first token of a request whose schema is new (compiled) vs cached.

One engine, in process (no HTTP), on the same weights, greedy, same random prompts:
- free: `--streams` requests with `ignore_eos`, exactly `--new-tokens` each;
- constrained: the same requests under a JSON Schema whose shortest valid output is longer than
  `--new-tokens` (an array with `minItems`), so every row also runs exactly `--new-tokens` and the
  batch stays full; the step then also computes each row's token mask (timed on its own) and masks
  the logits.
Prefill is untimed (until every row has its first token); tokens/s is decode tokens over decode time.
The two runs alternate `--repeats` times; the best of each counts (the box is shared and noisy).

TTFT: a single request, timed from "compile the schema" (the engine's compile pool) to its first
token: with a schema never seen before (the compile time is printed beside it), then with the same
schema again (a cache hit).

    python -m bench.structured --shape 110m --dtype bfloat16 --streams 16 --new-tokens 128 --threads 2
    python -m bench.structured --model weights/default --streams 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.engine import SHAPES, build_random, random_prompts
from model.checkpoint import load_config
from server.engine.config import EngineConfig
from server.engine.core import LLMEngine
from server.engine.outputs import Timings
from server.engine.params import SamplingParams
from server.engine.sequence import Request
from server.engine.structured import CompiledGrammar, Constraint

DEFAULT_MODEL = Path("weights/default")


def item_schema(tag: str) -> dict[str, Any]:
    """One list entry: the kinds of fields real schemas hold (enum, bounded integer, bounded string)."""
    return {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 9999},
            "kind": {"enum": ["alpha", "beta", "gamma", tag]},
            "label": {"type": "string", "maxLength": 12},
            "ok": {"type": "boolean"},
        },
        "required": ["id", "kind", "label", "ok"],
        "additionalProperties": False,
    }


def long_schema(new_tokens: int, tag: str = "delta") -> dict[str, Any]:
    """An object holding a list too long to finish within `new_tokens` (an entry is well over 4 tokens)."""
    return {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": item_schema(tag), "minItems": new_tokens // 4 + 1}
        },
        "required": ["items"],
        "additionalProperties": False,
    }


def make_engine(model_dir: Path, args: argparse.Namespace) -> LLMEngine:
    block = 16
    per_seq = -(-(args.prompt_tokens + args.new_tokens) // block) + 1
    return LLMEngine(
        EngineConfig(
            model=model_dir,
            dtype=args.dtype,
            kv_cache_tokens=max(
                args.streams * per_seq * block, load_config(model_dir).max_position_embeddings
            ),
            block_size=block,
            max_num_seqs=args.streams,
            prefill_chunk_tokens=max(256, args.streams * args.prompt_tokens),
            num_threads=args.threads,
            enforce_eager=args.enforce_eager,
        )
    )


def add(
    engine: LLMEngine, ids: list[int], params: SamplingParams, grammar: CompiledGrammar | None
) -> Request:
    request = Request(
        request_id="bench",
        prompt_ids=ids,
        params=params,
        max_tokens=engine.validate(ids, params),
        sink=None,
        timings=Timings(arrival=time.monotonic()),
        grammar=grammar,
    )
    engine.add(request)
    return request


class MaskTimer:
    """Wraps the engine's mask computation to time it apart from the rest of the step."""

    def __init__(self, engine: LLMEngine) -> None:
        self.seconds = 0.0
        self.calls = 0
        inner = engine.grammars.allowed_tokens

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1

        engine.grammars.allowed_tokens = timed  # type: ignore[method-assign]


def decode_run(
    engine: LLMEngine,
    prompts: list[list[int]],
    new_tokens: int,
    grammar: CompiledGrammar | None,
    masks: MaskTimer,
) -> dict[str, float]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=grammar is None)
    requests = [add(engine, ids, params, grammar) for ids in prompts]
    while any(r.timings.first_token is None for r in requests):
        engine.step()
    first = sum(r.completion_tokens for r in requests)
    masks.seconds, masks.calls = 0.0, 0
    steps: list[float] = []
    started = time.perf_counter()
    while engine.has_work:
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
    seconds = time.perf_counter() - started
    tokens = sum(r.completion_tokens for r in requests) - first
    if grammar is not None:
        for r in requests:  # a schema that finished early would shrink the batch and flatter the run
            assert all(s.finish_reason == "length" for s in r.sequences), "the schema finished early"
    return {
        "tokens_per_s": tokens / seconds,
        "decode_tokens": tokens,
        "step_ms_median": 1e3 * statistics.median(steps),
        "mask_ms_per_step": 1e3 * masks.seconds / masks.calls if masks.calls else 0.0,
    }


def ttft(engine: LLMEngine, ids: list[int], constraint: Constraint) -> tuple[float, float]:
    """Seconds from asking for the compiled schema to the first token, and the compile's own seconds."""
    started = time.perf_counter()
    grammar = engine.grammars.compile(constraint)
    request = add(engine, ids, SamplingParams(max_tokens=2, temperature=0.0), grammar)
    while request.timings.first_token is None:
        engine.step()
    seconds = time.perf_counter() - started
    while engine.has_work:
        engine.step()
    return seconds, grammar.seconds


def benchmark(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    engine = make_engine(model_dir, args)
    masks = MaskTimer(engine)
    vocab = engine.tokenizer.vocab_size
    prompts = random_prompts(args.streams, args.prompt_tokens, vocab, seed=0).tolist()
    grammar = engine.grammars.compile(Constraint("json_schema", json.dumps(long_schema(args.new_tokens))))
    decode_run(engine, prompts[:2], 4, None, masks)  # warm-up: first-call costs out of the timed runs
    decode_run(engine, prompts[:2], 4, grammar, masks)
    free, constrained = [], []
    for repeat in range(args.repeats):
        batch = random_prompts(args.streams, args.prompt_tokens, vocab, seed=1 + repeat).tolist()
        free.append(decode_run(engine, batch, args.new_tokens, None, masks))
        constrained.append(decode_run(engine, batch, args.new_tokens, grammar, masks))
    best_free = max(free, key=lambda r: r["tokens_per_s"])
    best_constrained = max(constrained, key=lambda r: r["tokens_per_s"])

    new, cached = [], []
    for i in range(args.repeats):
        schema = long_schema(args.new_tokens, tag=f"new-{i}-{time.time_ns()}")  # never seen before
        constraint = Constraint("json_schema", json.dumps(schema))
        ids = random_prompts(1, args.prompt_tokens, vocab, seed=100 + i).tolist()[0]
        new.append(ttft(engine, ids, constraint))
        cached.append(ttft(engine, ids, constraint))
    return {
        "config": vars(args) | {"model": str(model_dir)},
        "decode": {
            "free": best_free,
            "constrained": best_constrained,
            "ratio": best_constrained["tokens_per_s"] / best_free["tokens_per_s"],
            "runs": {"free": free, "constrained": constrained},
        },
        "ttft": {
            "new_schema_ms": 1e3 * statistics.median(s for s, _ in new),
            "compile_ms": 1e3 * statistics.median(c for _, c in new),
            "cached_schema_ms": 1e3 * statistics.median(s for s, _ in cached),
        },
    }


def print_report(report: dict[str, Any]) -> None:
    d, t, c = report["decode"], report["ttft"], report["config"]
    print(f"decode, {c['streams']} streams x {c['new_tokens']} tokens ({c['dtype'] or 'checkpoint dtype'}):")
    print("| rows | tok/s | step ms (median) | mask ms/step |")
    print("|---|---:|---:|---:|")
    for name in ("free", "constrained"):
        r = d[name]
        print(
            f"| {name} | {r['tokens_per_s']:.1f} | {r['step_ms_median']:.2f} | {r['mask_ms_per_step']:.3f} |"
        )
    print(f"constrained / free: {d['ratio']:.3f}x (target >= 0.9x)")
    print(
        f"TTFT: new schema {t['new_schema_ms']:.1f} ms (compile {t['compile_ms']:.1f} ms), "
        f"cached schema {t['cached_schema_ms']:.1f} ms"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint directory")
    source.add_argument(
        "--shape", choices=SHAPES, help="build a random-weight model of this shape in a temp dir"
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="alternating timed runs of each; the best counts")
    p.add_argument("--enforce-eager", action="store_true", help="no compiled decode steps (quick smoke runs)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if min(args.streams, args.prompt_tokens, args.threads, args.repeats) < 1 or args.new_tokens < 4:
        p.error("--streams, --prompt-tokens, --threads and --repeats must be >= 1, --new-tokens >= 4")
    if not args.shape and not (args.model / "config.json").is_file():
        p.error(f"{args.model} is not a checkpoint directory: pass --model DIR or --shape NAME")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        model_dir = build_random(Path(tmp), SHAPES[args.shape]) if args.shape else args.model
        report = benchmark(model_dir, args)
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
