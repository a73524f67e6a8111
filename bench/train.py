"""Training benchmark: tokens/s, MFU and bits per character of `model.train`, optionally old beside new.

Bits per character are tokenizer-independent, so the figure compares with character-level baselines
(nanoGPT's Shakespeare-char). Run from the repo root; unknown flags go to `model.train` unchanged:

    .venv/bin/python -m bench.train --data tinyshakespeare.txt --preset shakespeare --time-budget 600
    # the trainer at git revision REV beside this tree's, same flags, one after the other:
    .venv/bin/python -m bench.train --data tinyshakespeare.txt --preset default --max-steps 30 \\
        --against e37f71f --json out.json

Each run is a `python -m model.train` subprocess (REV's `model/` exported with `git archive` into a
temporary directory). The held-out split is model.train's own (`--val-fraction`, default the
nanoGPT-style last 10% of a single file), and the bpc is of the whole of it, with the best weights.
Tokens/s is the median over log intervals after the first (the first holds the compile and warm-up).
MFU is against the matmul rate this tree's trainer measured at start, in the dtype it chose, for
both runs: the old trainer does not log one.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any

from bench.harness import ROOT
from model.config import ModelConfig
from model.train import LOG_FILE

# `python -m model.train` with the `model` package taken from the directory given first.
LAUNCH = (
    "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
    "runpy.run_module('model.train', run_name='__main__', alter_sys=True)"
)


def run(code: Path, argv: list[str]) -> dict[str, Any]:
    """The trainer whose `model/` is in `code`, run with ARGV from the repo root; the figures from its log."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-c", LAUNCH, str(code), *argv, "--out", out, "--sample-tokens", "0"]
        subprocess.run(command, cwd=ROOT, check=True)
        records = [json.loads(line) for line in (Path(out) / LOG_FILE).read_text().splitlines()]
        params = ModelConfig.load(Path(out) / "config.json").num_parameters()
    final = records[-1]
    rated = [r for r in records if "tokens_per_s" in r]
    steady = rated[1:] or rated
    return {
        "parameters": params,
        "steps": final["step"],
        "stop_reason": final["stop_reason"],
        "first_interval_tokens_per_s": rated[0]["tokens_per_s"] if rated else None,
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in steady) if steady else None,
        "val_loss_per_token": final["val_loss"],
        "val_bpc": final["val_bpc"],
        "train_seconds": final["train_elapsed"],
        "wall_seconds": final["wall_time"],
        # Logged by this tree's trainer only:
        "dtype": final.get("dtype"),
        "compile": final.get("compile"),
        "matmul_flops_per_s": final.get("matmul_flops_per_s"),
        "flops_per_token": final.get("flops_per_token"),
    }


def export(revision: str, into: Path) -> Path:
    """The `model/` package as it was at `revision`, in `into`."""
    command = ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "model"]
    archive = subprocess.run(command, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def with_mfu(result: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    rate, flops, peak = result["tokens_per_s_median"], new["flops_per_token"], new["matmul_flops_per_s"]
    return result | {"mfu": rate * flops / peak if rate and flops and peak else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a text file (default: the Python standard library)")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="held-out tail, as nanoGPT's 10%%")
    parser.add_argument("--against", metavar="REV", help="also run the trainer of this git revision")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args, extra = parser.parse_known_args()
    argv = ["--preset", args.preset, "--val-fraction", str(args.val_fraction), *extra]
    argv += ["--data", args.data] if args.data else []
    result: dict[str, Any] = {
        "data": args.data or "python stdlib",
        "preset": args.preset,
        "extra_flags": extra,
        "machine": platform.processor() or platform.machine(),
    }
    if args.against:
        with tempfile.TemporaryDirectory() as tmp:
            old = run(export(args.against, Path(tmp)), argv)
        new = run(ROOT, argv)
        result |= {"against": args.against, "old": with_mfu(old, new), "new": with_mfu(new, new)}
        result["speedup"] = new["tokens_per_s_median"] / old["tokens_per_s_median"]
    else:
        new = run(ROOT, argv)
        result |= with_mfu(new, new)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
