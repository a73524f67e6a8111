"""Time to first token with and without a cached prefix.

A long shared prefix (a system prompt, a chat history) followed by a short new question: the first
request computes the whole prompt, later ones attach the prefix's cached blocks and compute only
the new tail. Prints median TTFT cold (prefix caching off) and warm, and the engine's hit counter.

    python -m bench.prefix_cache --model weights/default --prefix-tokens 768 --repeats 5
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from model.tokenizer import Tokenizer
from server.engine.config import EngineConfig
from server.engine.core import LLMEngine
from server.engine.outputs import Delta, Timings
from server.engine.params import SamplingParams
from server.engine.sequence import Request


def time_to_first_token(engine: LLMEngine, prompt: list[int]) -> float:
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    request = Request(
        "bench", prompt, params, engine.validate(prompt, params), None, Timings(time.monotonic())
    )
    start = time.perf_counter()
    engine.add(request)
    while not any(isinstance(item, Delta) for _, item in engine.step()):
        pass
    elapsed = time.perf_counter() - start
    while engine.has_work:
        engine.step()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("weights/default"))
    parser.add_argument("--prefix-tokens", type=int, default=768)
    parser.add_argument("--tail-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    rng = random.Random(0)
    vocab = Tokenizer.load(args.model).vocab_size
    prefix = [rng.randrange(vocab) for _ in range(args.prefix_tokens)]

    def prompt() -> list[int]:
        return prefix + [rng.randrange(vocab) for _ in range(args.tail_tokens)]

    results = {}
    for caching in (False, True):
        engine = LLMEngine(
            EngineConfig(model=args.model, enable_prefix_caching=caching, num_threads=args.threads)
        )
        time_to_first_token(engine, prompt())  # warm-up, and the prefix's first computation
        results[caching] = [time_to_first_token(engine, prompt()) for _ in range(args.repeats)]
        hits = engine.scheduler.prefix_hit_tokens
    cold, warm = statistics.median(results[False]), statistics.median(results[True])
    print(f"model {args.model}: prompt = {args.prefix_tokens} shared + {args.tail_tokens} new tokens")
    print("| prefix caching | TTFT median |")
    print("|---|---|")
    print(f"| off | {cold * 1000:.1f} ms |")
    print(
        f"| on | {warm * 1000:.1f} ms ({cold / warm:.1f}x faster; {hits} prompt tokens served from cache) |"
    )


if __name__ == "__main__":
    main()
