"""`python -m bench.speculative` end to end on the tiny checkpoint: it runs, both engines agree, the JSON
holds positive rates. Only the plumbing: the figures mean something only on a quiet machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.harness import ROOT
from tests.bench.test_bench_smoke import positive


def test_speculative_bench_writes_json(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "spec.json"
    command = [
        *(sys.executable, "-m", "bench.speculative", "--model", str(tiny_checkpoint)),
        *("--speculative-model", str(tiny_checkpoint), "--prompts", "2", "--prompt-tokens", "32"),
        *("--max-tokens", "8", "--streams", "2", "--max-num-seqs", "2", "--threads", "1"),
        *("--max-model-len", "256", "--enforce-eager", "--json", str(out)),
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| code | ngram |" in proc.stdout and "| text | draft |" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"code", "text", "text-sampled"}
    assert "| text-sampled | ngram |" in proc.stdout
    for name, workload in results.items():
        assert workload["identical"] is (None if name == "text-sampled" else True)
        for method in ("plain", "ngram", "draft"):
            assert positive(workload[method]["single_stream_tokens_per_s"])
            assert positive(workload[method]["2_streams_tokens_per_s"])
        if name != "text-sampled":  # greedy drafts of a random model rarely survive sampling
            assert workload["draft"]["accepted_tokens"] > 0  # the draft is the model itself
