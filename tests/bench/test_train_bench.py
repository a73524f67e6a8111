"""`python -m bench.train --against REV` end to end at the tiny size: both trainers run, the JSON holds
their figures. Only the plumbing is checked; timings on a shared machine are noise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.harness import ROOT
from tests.bench.test_bench_smoke import positive


def test_train_bench_runs_old_beside_new(tmp_path: Path) -> None:
    data = tmp_path / "text.txt"
    data.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(600)))
    out = tmp_path / "train.json"
    command = [
        *(sys.executable, "-m", "bench.train", "--preset", "tiny", "--data", str(data), "--against", "HEAD"),
        *("--max-steps", "6", "--log-interval", "2", "--eval-interval", "6", "--dtype", "float32"),
        *("--device", "cpu", "--json", str(out)),
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["against"] == "HEAD" and positive(report["speedup"])
    for side in ("old", "new"):
        run = report[side]
        assert run["steps"] == 6 and run["stop_reason"] == "max steps"
        for key in ("tokens_per_s_median", "val_bpc", "mfu", "parameters"):
            assert positive(run[key]), (side, key)
    assert report["new"]["dtype"] == "float32" and positive(report["new"]["matmul_flops_per_s"])
