"""The servers under test, each on a free loopback port: ours (`python -m server`) and the baseline."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from bench.harness import ROOT, RunningServer, free_port, launch, start_process


def our_flags(args: argparse.Namespace, dtype: str) -> list[str]:
    """`python -m server` flags for one sweep; `dtype` is a --dtypes entry (DTYPE or DTYPE+int8)."""
    dtype, _, quantization = dtype.partition("+")
    flags = ["--dtype", dtype, "--log-level", "warning"]
    if quantization:
        flags += ["--quantization", quantization]
    widest = max(args.concurrency or [args.max_concurrency or 0])
    if widest > 64:  # the server's default --max-num-seqs
        flags += ["--max-num-seqs", str(widest)]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    return flags + [a for extra in args.server_arg for a in shlex.split(extra)]


def start_ours(args: argparse.Namespace, model: Path, dtype: str, log_path: Path) -> RunningServer:
    flags = our_flags(args, dtype)
    print(f"starting python -m server --model {model} {shlex.join(flags)}", file=sys.stderr, flush=True)
    return launch(model, log_path, *flags)


def start_hf(model: Path, dtype: str, threads: int | None, log_path: Path) -> RunningServer:
    """bench/hf_server.py on the same weights: transformers, one request at a time."""
    port = free_port()
    command = [sys.executable, "-m", "bench.hf_server", "--model", str(model), "--dtype", dtype]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    command += ["--threads", str(threads)] if threads else []
    print(f"starting {shlex.join(command)}", file=sys.stderr, flush=True)
    return start_process(command, port, log_path, model=model.name, ready_path="/health")


def build_random_110m(directory: Path) -> Path:
    """bench/engine.py's ~110M random checkpoint, built in a child process so this one never loads torch."""
    code = "import sys, pathlib, bench.engine as e; e.build_random_110m(pathlib.Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(directory)], cwd=ROOT, check=True)
    return directory
