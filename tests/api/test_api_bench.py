"""`python -m bench.http_overhead` end to end on the tiny checkpoint: it runs and reports positive figures.

Only the plumbing is checked; timings on a shared machine are noise.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from bench.harness import ROOT


def test_http_overhead_bench_runs(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    command = [
        sys.executable, "-m", "bench.http_overhead", "--model", str(tiny_checkpoint),
        "--streams", "1,2", "--new-tokens", "8", "--repeats", "1", "--threads", "1", "--enforce-eager",
        "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "engine tok/s" in proc.stdout and "http tok/s" in proc.stdout
    rows = json.loads(out.read_text())["results"]
    assert [r["streams"] for r in rows] == [1, 2]
    for row in rows:
        for side in ("engine", "http"):
            assert all(math.isfinite(v) and v > 0 for v in row[side].values()), row
