"""Start-up faults end start-up in seconds with one `error:` line and a non-zero exit code, and the port
never accepts a connection: broken weights (eleven fixtures), a port in use, impossible KV budgets.

While each case runs, a prober tries to connect to its port. Every case runs through the server's
`main()` in this process (the same code `python -m server` runs, without a torch import each), and
a few also as real processes, for their exit codes and their whole stderr.
"""

from __future__ import annotations

import gc
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from bench.harness import ROOT, free_port
from server.__main__ import main as server_main

DEADLINE_S = 60  # a generous bound for "seconds" on a loaded 2-core machine; typical is 3-6 s


@dataclass
class Outcome:
    returncode: int
    stderr: str
    seconds: float
    connected: bool


def run_and_probe(args: list[str], port: int, probe: bool = True) -> Outcome:
    """Run the server to its exit, trying to connect to `port` every 20 ms meanwhile."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    connected = False
    while probe and proc.poll() is None and time.monotonic() - start < DEADLINE_S:
        with socket.socket() as s:
            s.settimeout(0.2)
            connected = connected or s.connect_ex(("127.0.0.1", port)) == 0
        time.sleep(0.02)
    try:
        _, stderr = proc.communicate(timeout=max(1.0, DEADLINE_S - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    return Outcome(proc.returncode, stderr, time.monotonic() - start, connected)


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_tensors(directory: Path, edit: Callable[[dict], None]) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _truncate(directory: Path) -> None:
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _drop_first_layer_tensor(tensors: dict) -> None:
    del tensors[next(k for k in sorted(tensors) if ".layers.0." in k)]


def _add_unknown_tensor(tensors: dict) -> None:
    tensors["model.layers.99.mlp.up_proj.weight"] = next(iter(tensors.values())).clone()


# name → (how to break a copy of the checkpoint, a fragment the error line must contain)
BROKEN_WEIGHTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing-directory": (lambda d: shutil.rmtree(d), "not a checkpoint directory"),
    "no-weights-file": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
    "truncated-weights": (_truncate, "model.safetensors"),
    "empty-weights": (lambda d: (d / "model.safetensors").write_bytes(b""), "model.safetensors"),
    "garbage-weights": (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 4096), "model.safetensors"),
    "shapes-mismatch-config": (lambda d: _edit_json(d / "config.json", intermediate_size=96), "shape"),
    "missing-tensor": (lambda d: _edit_tensors(d, _drop_first_layer_tensor), "missing tensor"),
    "unexpected-tensor": (lambda d: _edit_tensors(d, _add_unknown_tensor), "unexpected tensor"),
    "config-not-json": (lambda d: (d / "config.json").write_text("{not json"), "config.json"),
    "no-tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
    "tokenizer-larger-than-model": (
        lambda d: (
            _edit_tensors(d, lambda t: t.update({k: v[:300] for k, v in t.items() if v.shape[0] == 512}))
            or _edit_json(d / "config.json", vocab_size=300)
        ),
        "tokenizer has 512 tokens",
    ),
}
BAD_FLAGS: dict[str, tuple[list[str], str]] = {
    "kv-cache-smaller-than-one-sequence": (["--kv-cache-tokens", "16"], "cannot hold one sequence"),
    "kv-cache-memory-too-small": (["--kv-cache-memory", "1K"], "cannot hold one sequence"),
    "kv-cache-larger-than-memory": (["--kv-cache-tokens", str(10**10)], "GiB"),
    "context-longer-than-the-model": (["--max-model-len", "100000"], "--max-model-len"),
    "int8-on-a-gpu": (
        ["--quantization", "int8", "--device", "cuda"],
        "--quantization int8 runs on the CPU only",
    ),
}


def assert_clean_failure(name: str, outcome: Outcome, fragment: str) -> None:
    assert outcome.returncode not in (0, None), (name, outcome)
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and len(lines) == 1, (name, outcome.stderr)  # one line, nothing else
    assert fragment in errors[0], (name, errors[0])
    assert outcome.seconds < DEADLINE_S, (name, outcome.seconds)
    assert not outcome.connected, f"{name}: the port accepted a connection before start-up failed"


def all_cases(tiny_checkpoint: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    cases: dict[str, tuple[list[str], str]] = {}
    for name, (breaker, fragment) in BROKEN_WEIGHTS.items():
        directory = tmp_path / name
        shutil.copytree(tiny_checkpoint, directory)
        breaker(directory)
        cases[name] = (["--model", str(directory)], fragment)
    for name, (flags, fragment) in BAD_FLAGS.items():
        cases[name] = (["--model", str(tiny_checkpoint), *flags], fragment)
    return cases


def run_main_and_probe(args: list[str], port: int, capsys: pytest.CaptureFixture[str]) -> Outcome:
    """`server.__main__.main` in this process, with the same prober in a thread."""
    done = threading.Event()
    connected: list[bool] = []

    def probe() -> None:
        while not done.is_set():
            with socket.socket() as s:
                s.settimeout(0.2)
                connected.append(s.connect_ex(("127.0.0.1", port)) == 0)
            time.sleep(0.005)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    start = time.monotonic()
    try:
        code = server_main(["--host", "127.0.0.1", "--port", str(port), *args])
    finally:
        done.set()
        prober.join(5)
    gc.collect()  # the failed run's bound (never listening) socket
    return Outcome(code, capsys.readouterr().err, time.monotonic() - start, any(connected))


def test_startup_faults_fail_fast_with_one_line(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = all_cases(tiny_checkpoint, tmp_path)
    for name, (args, fragment) in cases.items():
        assert_clean_failure(name, run_main_and_probe(args, free_port(), capsys), fragment)


REAL_PROCESS_CASES = ("truncated-weights", "shapes-mismatch-config", "kv-cache-larger-than-memory")


def test_startup_faults_in_real_processes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    cases = all_cases(tiny_checkpoint, tmp_path)
    chosen = [(name, *cases[name]) for name in REAL_PROCESS_CASES]
    with ThreadPoolExecutor(max_workers=3) as pool:
        outcomes = list(pool.map(lambda case: run_and_probe(case[1], free_port()), chosen))
    for (name, _, fragment), outcome in zip(chosen, outcomes, strict=True):
        assert_clean_failure(name, outcome, fragment)
    exits = ", ".join(f"{o.seconds:.1f}" for o in outcomes)
    print(f"\nstart-up faults in real processes: exits after {exits} s")


def test_port_in_use_fails_before_loading(tiny_checkpoint: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ["--model", str(tiny_checkpoint), "--host", "localhost"]  # 127.0.0.1 in test_api_lifecycle
        outcome = run_and_probe(args, port, probe=False)  # the port is ours: probing would prove nothing
    assert_clean_failure("port-in-use", outcome, str(port))
    assert "cannot bind" in outcome.stderr
