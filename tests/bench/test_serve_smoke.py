"""`python -m bench.serve` and bench/hf_server.py end to end on the tiny checkpoint, plus their pure helpers.

Only the plumbing is checked (outputs exist, counts are exact, latencies are ordered and positive): the
figures themselves mean something only on a quiet machine and a real model.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bench.harness import ROOT, is_loopback, percentile
from bench.serve.cli import parse_args
from bench.serve.launch import our_flags, start_hf
from bench.serve.load import chunk_tokens
from bench.serve.stats import step_histograms, step_time

PROMPT, OUTPUT, REQUESTS = 16, 8, 3


def positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_sweep_writes_sane_json_csv_and_plots(tiny_checkpoint: Path, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "bench.serve", "--model", str(tiny_checkpoint),
        "--concurrency", "1,2", "--num-requests", str(REQUESTS), "--prompt-tokens", str(PROMPT),
        "--output-tokens", str(OUTPUT), "--threads", "1", "--warmup", "1",
        "--out-dir", str(tmp_path), "--tag", "smoke", "--server-arg=--enforce-eager",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "targets" in proc.stdout

    report = json.loads((tmp_path / "smoke.json").read_text())
    rows = report["results"]
    assert [(r["server"], r["level"]) for r in rows] == [("ours", 1), ("ours", 2)]
    for r in rows:
        assert (r["requests"], r["completed"], r["errors"], r["short_outputs"]) == (REQUESTS, REQUESTS, 0, 0)
        assert r["output_tokens"] == REQUESTS * OUTPUT  # ignore_eos + max_tokens: exact lengths
        assert r["mean_prompt_tokens"] == PROMPT  # token-id prompts: exact lengths
        assert r["tokens_per_chunk"] == 1.0  # logprobs: 0 makes every token its own chunk
        for name in ("ttft", "itl", "e2e"):
            p50, p90, p99 = (r[f"{name}_ms_p{q}"] for q in (50, 90, 99))
            assert positive(p50) and p50 <= p90 <= p99, (name, p50, p90, p99)
        assert r["ttft_ms_p50"] <= r["e2e_ms_p50"]
        for key in ("output_tokens_per_s", "requests_per_s", "duration_s", "tpot_ms_mean", "server_tpot_ms"):
            assert positive(r[key]), key
    assert {t["status"] for t in report["targets"]} <= {"PASS", "MISS", "n/a"}
    assert len(report["targets"]) == 7

    with (tmp_path / "smoke.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [row["level"] for row in table] == ["1", "2"]
    assert float(table[1]["output_tokens_per_s"]) == pytest.approx(rows[1]["output_tokens_per_s"])
    assert "| ours | float32 | 2 |" in (tmp_path / "smoke.md").read_text()
    if importlib.util.find_spec("matplotlib"):
        for name in ("smoke-throughput.png", "smoke-latency.png"):
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.slow
def test_hf_baseline_streams_one_token_per_chunk(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    with start_hf(tiny_checkpoint, "float32", 1, tmp_path / "hf.log") as server:
        body = {
            "model": "x",
            "prompt": list(range(3, 3 + PROMPT)),
            "max_tokens": OUTPUT,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "logprobs": 0,
            "stream_options": {"include_usage": True},
        }
        url = server.url + "/v1/completions"
        with httpx.stream("POST", url, json=body, timeout=30, trust_env=False) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    tokens = [c for c in chunks if c["choices"]]
    assert [chunk_tokens(c["choices"][0]) for c in tokens] == [1] * OUTPUT
    assert tokens[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {"prompt_tokens": PROMPT, "completion_tokens": OUTPUT,
                                   "total_tokens": PROMPT + OUTPUT}  # fmt: skip


def test_refuses_remote_urls_unless_allowed() -> None:
    assert is_loopback("http://127.0.0.1:8000") and is_loopback("http://[::1]:80/v1")
    assert is_loopback("http://localhost:8000")
    assert not is_loopback("http://10.0.0.7:8000") and not is_loopback("https://example.com")
    command = [sys.executable, "-m", "bench.serve", "--base-url", "http://10.0.0.7:8000"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--allow-remote" in proc.stderr


def test_percentiles_and_metrics_parsing() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)
    before = step_histograms(
        'tinyserve_engine_step_duration_seconds_bucket{le="0.1"} 3\n'
        "tinyserve_engine_step_duration_seconds_sum 0.5\ntinyserve_engine_step_duration_seconds_count 4\n"
    )
    after = step_histograms(
        "# TYPE tinyserve_engine_step_duration_seconds histogram\n"
        "tinyserve_engine_step_duration_seconds_sum 1.5\ntinyserve_engine_step_duration_seconds_count 14\n"
        "tinyserve_requests_total 9\n"
    )
    ms, source = step_time(before, after)
    assert ms == pytest.approx(100.0) and "tinyserve_engine_step_duration_seconds" in source
    assert step_time({}, {}) == (None, None)


def test_a_dtypes_entry_can_quantize_the_weights() -> None:
    args = parse_args(["--model", str(ROOT / "weights" / "default"), "--dtypes", "bfloat16,bfloat16+int8"])
    plain, quantized = (our_flags(args, d) for d in args.dtypes)
    assert plain[:2] == quantized[:2] == ["--dtype", "bfloat16"]
    assert "--quantization" not in plain
    assert quantized[quantized.index("--quantization") + 1] == "int8"
    for bad in (["--dtypes", "bfloat16+int4"], ["--dtypes", "bfloat16+int8", "--compare-hf"]):
        with pytest.raises(SystemExit):
            parse_args(["--model", str(ROOT / "weights" / "default"), *bad])
