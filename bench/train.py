"""Training benchmark: tokens/s of `model.train`, and bits per character on held-out text after a fixed time.

Bits per character is tokenizer-independent, so the figure compares with character-level baselines
(nanoGPT's Shakespeare-char: ~1.88 nats/char = ~2.71 bpc after ~3 CPU minutes). Run from the repo root:

    .venv/bin/python -m bench.train --data /path/to/tinyshakespeare.txt --time-budget 180 \
        --preset default --vocab-size 1024 --seq-len 256 --json out.json

Unknown flags go to `model.train` unchanged. The held-out split is model.train's own (the tail
--val-fraction of a single file), and the bpc is of the whole of it, with the best weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from model.config import ModelConfig
from model.train import LOG_FILE
from model.train import main as train_main


def run(
    data: str | None, time_budget: str, preset: str, val_fraction: float, extra: list[str]
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        argv = [
            "--preset",
            preset,
            "--out",
            out,
            "--time-budget",
            time_budget,
            "--val-fraction",
            str(val_fraction),
        ]
        argv += ["--data", data] if data else []
        final = train_main([*argv, "--sample-tokens", "0", *extra])
        records = [json.loads(line) for line in (Path(out) / LOG_FILE).read_text().splitlines()]
        params = ModelConfig.load(Path(out) / "config.json").num_parameters()
    # The first interval includes warm-up (allocator, first backward); the median ignores stragglers.
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    return {
        "data": data or "python stdlib",
        "preset": preset,
        "extra_flags": extra,
        "time_budget": time_budget,
        "parameters": params,
        "steps": final["step"],
        "tokens_per_s_median": statistics.median(rates) if rates else None,
        "val_loss_per_token": final["val_loss"],
        "val_bpc": final["val_bpc"],
        "train_seconds": final["train_elapsed"],
        "wall_seconds": final["wall_time"],
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a text file (default: the Python standard library)")
    parser.add_argument("--time-budget", default="180", help="training seconds (or 3m, ...)")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="held-out tail, as nanoGPT's 10%%")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args, extra = parser.parse_known_args()
    result = run(args.data, args.time_budget, args.preset, args.val_fraction, extra)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
