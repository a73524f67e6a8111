"""Training text for a draft model: the served model's own greedy continuations of training code.

A draft proposes the tokens the target would pick, so it learns best from what the target writes
(sequence-level distillation) rather than from the corpus alone. This writes one text file per
prompt, the prompt (standard-library code from a line start on, from the trainer's training split,
never from the files `bench.speculative` takes its `code` prompts from) followed by the target's
greedy continuation, for `python -m model.train --data OUT_DIR --extensions .txt`:

    .venv/bin/python -m bench.draft_data --model weights/default --out runs/draft-data --minutes 8
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from bench.speculative import VAL_FRACTION, generate
from model.data import read_corpus, split_documents
from server.engine.config import EngineConfig
from server.engine.core import LLMEngine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="the target checkpoint directory")
    p.add_argument("--out", type=Path, required=True, help="directory for the text files")
    p.add_argument("--minutes", type=float, default=8.0, help="no batch starts after this (the first does)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=32, help="prompts generated at once")
    p.add_argument("--dtype", default=None, help="default: the checkpoint's (what it serves in)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true", help="no compiled decode steps (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    engine = LLMEngine(
        EngineConfig(
            model=args.model,
            dtype=args.dtype,
            max_num_seqs=args.batch,
            num_threads=args.threads,
            enforce_eager=args.enforce_eager,
        )
    )
    train, _ = split_documents(read_corpus(None), VAL_FRACTION)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * args.minutes
    written = tokens = 0
    while True:
        prompts = []
        while len(prompts) < args.batch:
            text = rng.choice(train).text
            start = text.rfind("\n", 0, rng.randrange(len(text))) + 1  # a line start
            ids = engine.tokenizer.encode(text[start : start + 16 * args.prompt_tokens])  # enough text
            if len(ids) > args.prompt_tokens:
                prompts.append(ids[: args.prompt_tokens])
        run = generate(engine, prompts, args.new_tokens, together=True)
        for prompt, continuation in zip(prompts, run.tokens, strict=True):
            text = engine.tokenizer.decode(prompt + continuation)
            (args.out / f"{written:06d}.txt").write_text(text, encoding="utf-8")
            written += 1
            tokens += len(continuation)
        print(f"{written} files, {tokens} generated tokens", flush=True)
        if time.monotonic() >= deadline:
            break


if __name__ == "__main__":
    main()
