"""`python -m bench.engine` end to end on the tiny checkpoint: it runs, and its JSON holds positive numbers.

Only the plumbing is checked (timings on a shared machine are noise); the benchmark itself is for
people to run on a quiet one.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from bench.harness import ROOT


def positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_engine_bench_writes_json(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [
        *(sys.executable, "-m", "bench.engine"),
        *("--model", str(tiny_checkpoint), "--batch-sizes", "1,2", "--prompt-tokens", "8"),
        *("--new-tokens", "8", "--threads", "1", "--repeats", "2", "--json", str(out), "--skip-llamacpp"),
        "--enforce-eager",
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ours/transformers" in proc.stdout

    report = json.loads(out.read_text())
    assert report["config"]["batch_sizes"] == [1, 2]
    machine = report["machine"]
    for key in ("read_gbs", "sum_gbs", "copy_gbs", "bandwidth_gbs", "matmul_gflops"):
        assert positive(machine[key]), key
    assert machine["bandwidth_gbs"] == max(machine["read_gbs"], machine["sum_gbs"])
    assert [r["batch_size"] for r in report["results"]] == [1, 2]
    for r in report["results"]:
        ours = r["ours"]
        assert ours["decode_tokens"] == r["batch_size"] * 7  # N - 1 decode tokens per sequence
        assert ours["min_rows"] == r["batch_size"]  # the whole batch decoded in every timed step
        for value in (ours["tokens_per_s"], ours["step_ms_median"], r["matmul_only_step_ms"]):
            assert positive(value)
        assert positive(r["transformers"]["tokens_per_s"])
        assert positive(r["transformers"]["prefill_s"])
        for key in ("step_ms", "tokens_per_s", "weight_ms", "kv_ms", "compute_ms"):
            assert positive(r["roofline"][key]), key
        assert r["roofline"]["bound"] in ("memory", "compute")
        assert positive(r["ratios"]["ours_over_transformers"])
        assert positive(r["ratios"]["ours_over_roofline"])
        assert positive(r["ratios"]["step_over_matmul_only"])


def test_structured_bench_writes_json(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "structured.json"
    command = [
        *(sys.executable, "-m", "bench.structured", "--model", str(tiny_checkpoint), "--streams", "2"),
        *("--prompt-tokens", "8", "--new-tokens", "12", "--threads", "1", "--repeats", "1"),
        *("--enforce-eager", "--json", str(out)),
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "constrained / free" in proc.stdout
    report = json.loads(out.read_text())
    for run in ("free", "constrained"):
        assert report["decode"][run]["decode_tokens"] == 2 * 11  # every row decoded the whole run
        assert positive(report["decode"][run]["tokens_per_s"])
    assert positive(report["decode"]["constrained"]["mask_ms_per_step"])
    for key in ("new_schema_ms", "compile_ms", "cached_schema_ms"):
        assert positive(report["ttft"][key]), key
