"""What a sweep found: the table, ratios between runs, the targets, the machine, and the files."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, fields
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.harness import ROOT
from bench.serve.plots import plot
from bench.serve.stats import PERCENTILES, LevelResult

TARGET_STREAMS = 16


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


COLUMNS = (
    "server",
    "dtype",
    "level",
    "done/err",
    "out tok/s",
    "req/s",
    "TTFT p50/p90/p99 ms",
    "ITL p50/p90/p99 ms",
    "E2E p50/p90/p99 s",
    "server ms/token, step",
)


def row_cells(r: LevelResult) -> list[str]:
    def trio(name: str, scale: float = 1.0, digits: int = 0) -> str:
        values = [getattr(r, f"{name}_ms_p{q}") for q in PERCENTILES]
        return " / ".join(fmt(v and v / scale, digits) for v in values)

    return [
        r.server,
        r.dtype,
        f"{r.level:g}",
        f"{r.completed}/{r.errors}",
        fmt(r.output_tokens_per_s),
        fmt(r.requests_per_s, 2),
        trio("ttft"),
        trio("itl", digits=1),
        trio("e2e", 1000, 2),
        f"{fmt(r.server_tpot_ms)}, {fmt(r.server_step_ms)}",
    ]


def print_row(r: LevelResult, prompt_form: str) -> None:
    extra = f", {r.short_outputs} outputs not of max_tokens" if r.short_outputs else ""
    errors = f", errors e.g. {r.error_samples[0]}" if r.error_samples else ""
    print(
        f"  {r.server} {r.dtype} {r.mode} {r.level:g}: {r.completed}/{r.requests} ok in {r.duration_s:.1f}s, "
        f"{r.output_tokens_per_s:.1f} tok/s, TTFT p50 {fmt(r.ttft_ms_p50, 0)} ms, ITL p50 "
        f"{fmt(r.itl_ms_p50)} ms p99 {fmt(r.itl_ms_p99)} ms ({prompt_form} prompts{extra}{errors})",
        file=sys.stderr,
        flush=True,
    )


def markdown_table(rows: list[LevelResult]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * 3 + "---:|" * (len(COLUMNS) - 3)]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def by_level(rows: list[LevelResult], server: str, dtype: str) -> dict[float, LevelResult]:
    return {r.level: r for r in rows if r.server == server and r.dtype == dtype and r.completed}


def comparisons(rows: list[LevelResult], dtypes: list[str]) -> list[dict[str, Any]]:
    """Ratios at each level both runs reached: ours/baseline throughput, baseline/ours TTFT p50, bf16/fp32."""
    ours = by_level(rows, "ours", dtypes[0])
    out = []
    for other, dtype in [("hf-baseline", dtypes[0])] + [("ours", d) for d in dtypes[1:]]:
        for level, theirs in by_level(rows, other, dtype).items():
            mine = ours.get(level)
            if not mine or not theirs.output_tokens_per_s:
                continue
            entry: dict[str, Any] = {"level": level, "vs": f"{other} {dtype}"}
            if other == "hf-baseline":
                entry["throughput_ours_over_baseline"] = mine.output_tokens_per_s / theirs.output_tokens_per_s
                if mine.ttft_ms_p50 and theirs.ttft_ms_p50:
                    entry["ttft_p50_baseline_over_ours"] = theirs.ttft_ms_p50 / mine.ttft_ms_p50
            else:
                entry[f"throughput_{dtype}_over_{dtypes[0]}"] = (
                    theirs.output_tokens_per_s / mine.output_tokens_per_s
                )
            out.append(entry)
    return out


def targets(rows: list[LevelResult], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The issue's targets at 16 and 1 streams: PASS, MISS, or n/a when this run did not measure it."""
    primary, n = args.dtypes[0], TARGET_STREAMS
    closed = [r for r in rows if r.mode == "concurrency"]
    ours = by_level(closed, "target" if args.base_url else "ours", primary)
    r16, r1 = ours.get(n), ours.get(1)
    h16 = by_level(closed, "hf-baseline", primary).get(n)
    b16 = by_level(closed, "ours", "bfloat16").get(n) if primary == "float32" else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    tps, ttft = r16 and r16.output_tokens_per_s, r16 and r16.ttft_ms_p50
    # The engine's decode step, best first: measured without HTTP (bench/http_overhead.py), the server's
    # own time per output token (decode steps only), the mean of its step histogram (prefills included).
    step, source = args.engine_step_ms, "--engine-step-ms"
    if step is None and r1:
        step, source = r1.server_tpot_ms, "the server's usage timings"
        if step is None:
            step, source = r1.server_step_ms, r1.server_step_source
    spread = ratio(r16 and r16.itl_ms_p99, r16 and r16.itl_ms_p50)
    itl1 = ratio(r1 and r1.itl_ms_p50, step)
    thr, lat = ratio(tps, h16 and h16.output_tokens_per_s), ratio(h16 and h16.ttft_ms_p50, ttft)
    bf = ratio(b16 and b16.output_tokens_per_s, tps)
    need16 = f"needs a --concurrency level of {n}"
    checks = [  # (target, measured, passes, shown, why it may be missing)
        (f"{n} streams: output >= 600 tok/s", tps, tps and tps >= 600, f"{fmt(tps)} tok/s", need16),
        (f"{n} streams: TTFT p50 <= 1 s", ttft, ttft and ttft <= 1000, f"{fmt(ttft, 0)} ms", need16),
        (f"{n} streams: ITL p99 <= 3x ITL p50", spread, spread and spread <= 3,
         f"{fmt(spread, 2)}x ({fmt(r16 and r16.itl_ms_p99)} / {fmt(r16 and r16.itl_ms_p50)} ms)", need16),
        ("1 stream: ITL p50 within 10% of the engine's step", itl1, itl1 and abs(itl1 - 1) <= 0.1,
         f"{fmt(itl1, 3)}x ({fmt(r1 and r1.itl_ms_p50, 2)} vs {fmt(step, 2)} ms from {source})",
         "needs a --concurrency level of 1 and the step time (server /metrics or usage timings, or "
         "--engine-step-ms from bench/http_overhead.py)"),
        (f"{n} streams: >= 10x the transformers baseline's throughput", thr, thr and thr >= 10,
         f"{fmt(thr, 1)}x ({fmt(tps)} vs {fmt(h16 and h16.output_tokens_per_s)} tok/s)",
         f"needs --compare-hf and {need16[6:]}"),
        (f"{n} streams: >= 10x lower TTFT p50 than the baseline", lat, lat and lat >= 10,
         f"{fmt(lat, 1)}x ({fmt(h16 and h16.ttft_ms_p50, 0)} vs {fmt(ttft, 0)} ms)",
         f"needs --compare-hf and {need16[6:]}"),
        (f"{n} streams: bfloat16 >= 2x float32 throughput", bf, bf and bf >= 2,
         f"{fmt(bf, 2)}x ({fmt(b16 and b16.output_tokens_per_s)} vs {fmt(tps)} tok/s)",
         f"needs --dtypes float32,bfloat16 and {need16[6:]}"),
    ]  # fmt: skip
    return [
        {"target": name, "status": "n/a" if value is None else "PASS" if passes else "MISS",
         "measured": value, "shown": shown if value is not None else why}
        for name, value, passes, shown, why in checks
    ]  # fmt: skip


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("torch", "transformers", "httpx"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **versions,
        "git_commit": commit.stdout.strip() or None,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_outputs(args: argparse.Namespace, rows: list[LevelResult], report: dict[str, Any]) -> list[Path]:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    prefix = args.out_dir / args.tag
    paths = [prefix.with_name(f"{prefix.name}.{ext}") for ext in ("json", "csv", "md")]
    paths[0].write_text(json.dumps(report, indent=2, default=str) + "\n")
    names = [f.name for f in fields(LevelResult) if f.name != "error_samples"]
    with paths[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    pngs = plot(rows, prefix, report["config"]["mode"], report["config"]["title"])
    m = report["machine"]
    busy = m["load_average_at_start"][0] > 0.5 * m["usable_cpus"]
    md = [
        f"### {report['config']['title']}",
        "",
        f"Machine: {m['cpu']}, {m['usable_cpus']} CPUs usable (load average at start "
        f"{m['load_average_at_start'][0]:.1f}); torch {m.get('torch', '?')}, transformers "
        f"{m.get('transformers', '?')}; commit {m['git_commit']}, {m['date']}.",
        "",
        f"```sh\n{report['command']}\n```",
        "",
    ]
    if busy:
        md += ["**Noisy**: other work was running on this machine; take these numbers as a dry run.", ""]
    md += [markdown_table(rows), ""]
    if report["comparison"]:
        md += ["| level | compared with | ratio |", "|---:|---|---:|"]
        for c in report["comparison"]:
            for key, value in c.items():
                if key not in ("level", "vs"):
                    md.append(f"| {c['level']:g} | {c['vs']} | {key} = {value:.2f} |")
        md.append("")
    md += ["| target | status | measured |", "|---|---|---|"]
    md += [f"| {t['target']} | {t['status']} | {t['shown']} |" for t in report["targets"]]
    md += [""] + [f"![{p.stem}]({p.name})" for p in pngs]
    paths[2].write_text("\n".join(md) + "\n")
    return paths + pngs
