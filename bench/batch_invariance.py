"""How often does sharing a batch change a seeded request's output?

Each prompt runs alone, then all of them together arriving at staggered steps, with the same
seeds. Batched matrix products may round differently from unbatched ones, and one flipped
near-tie changes every later token. The default mode is measured against `--deterministic`,
which runs every sequence on its own at fixed chunk boundaries and must never diverge.

    python -m bench.batch_invariance --model weights/default --prompts 64
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from model.tokenizer import Tokenizer
from server.engine.config import EngineConfig
from server.engine.core import LLMEngine
from server.engine.outputs import Delta, Timings
from server.engine.params import SamplingParams
from server.engine.sequence import Request


def generate(
    engine: LLMEngine, jobs: list[tuple[list[int], SamplingParams]], stagger: int
) -> list[list[int]]:
    """Run `jobs` (one every `stagger` steps) to completion; return each one's tokens."""
    tokens: dict[int, list[int]] = {}
    order: list[Request] = []
    pending = list(jobs)
    step = 0
    while pending or engine.has_work:
        if pending and step % max(stagger, 1) == 0:
            prompt, params = pending.pop(0)
            request = Request(
                "bench", prompt, params, engine.validate(prompt, params), None, Timings(time.monotonic())
            )
            engine.add(request)
            order.append(request)
            tokens[id(request)] = []
        for request, item in engine.step():
            if isinstance(item, Delta):
                tokens[id(request)].extend(item.token_ids)
        step += 1
    return [tokens[id(r)] for r in order]


def measure(
    model: Path, deterministic: bool, prompts: list[list[int]], max_tokens: int, dtype: str | None
) -> int:
    engine = LLMEngine(EngineConfig(model=model, deterministic=deterministic, dtype=dtype, max_num_seqs=64))
    jobs = [
        (p, SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=i, ignore_eos=True))
        for i, p in enumerate(prompts)
    ]
    alone = [generate(engine, [job], 1)[0] for job in jobs]
    together = generate(engine, jobs, stagger=2)
    return sum(a != b for a, b in zip(alone, together, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("weights/default"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    vocab = Tokenizer.load(args.model).vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(4, 200))] for _ in range(args.prompts)]
    print(f"model {args.model}: {args.prompts} seeded prompts x {args.max_tokens} tokens, dtype {args.dtype}")
    print("| mode | outputs that differ alone vs batched |")
    print("|---|---|")
    for deterministic in (False, True):
        diverged = measure(args.model, deterministic, prompts, args.max_tokens, args.dtype)
        name = "--deterministic" if deterministic else "default"
        print(f"| {name} | {diverged} / {args.prompts} ({100 * diverged / args.prompts:.1f}%) |", flush=True)
        if deterministic and diverged:
            sys.exit("deterministic mode diverged: that is a bug")


if __name__ == "__main__":
    main()
