"""One level's requests as one row: throughput, latency percentiles, and the server's own step time."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import httpx

from bench.harness import Scrape, percentile
from bench.serve.load import RequestResult

PERCENTILES = (50, 90, 99)

StepSums = dict[tuple[str, str], list[float]]
"""{(histogram name, labels): [sum, count]} for the histograms of engine step durations."""


@dataclass
class LevelResult:
    """One sweep point: the row of the CSV and of the README table."""

    server: str
    dtype: str
    mode: str
    level: float
    requests: int
    completed: int
    errors: int
    duration_s: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    mean_prompt_tokens: float | None
    mean_output_tokens: float | None
    short_outputs: int
    """Completed requests whose output length differs from max_tokens (should be 0 with ignore_eos)."""
    tokens_per_chunk: float | None
    """Above 1 when the server merges tokens into one chunk: ITL then counts gaps between chunks."""
    ttft_ms_p50: float | None = None
    ttft_ms_p90: float | None = None
    ttft_ms_p99: float | None = None
    itl_ms_p50: float | None = None
    itl_ms_p90: float | None = None
    itl_ms_p99: float | None = None
    e2e_ms_p50: float | None = None
    e2e_ms_p90: float | None = None
    e2e_ms_p99: float | None = None
    tpot_ms_mean: float | None = None
    """Per request (last token - first token) / (tokens - 1), averaged over requests."""
    server_tpot_ms: float | None = None
    """The server's own mean time per output token (usage chunk `timings`), averaged over requests."""
    server_step_ms: float | None = None
    """Mean engine step from a step-duration histogram on the server's /metrics, when it has one."""
    server_step_source: str | None = None
    server_steps: int | None = None
    error_samples: list[str] = field(default_factory=list)


def summarize(server: str, dtype: str, mode: str, level: float, results: list[RequestResult]) -> LevelResult:
    ok = [r for r in results if r.error is None]
    start = min((r.start for r in results), default=0.0)
    duration = max((r.end for r in results), default=0.0) - start
    tokens = sum(r.output_tokens for r in ok)
    chunks = sum(r.chunks for r in ok)
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    server_tpot = [r.server_tpot_ms for r in ok if r.server_tpot_ms is not None]
    tpot = [
        (r.last_token - r.start - r.ttft) / (r.output_tokens - 1)
        for r in ok
        if r.output_tokens > 1 and r.ttft
    ]
    row = LevelResult(
        server=server,
        dtype=dtype,
        mode=mode,
        level=level,
        requests=len(results),
        completed=len(ok),
        errors=len(results) - len(ok),
        duration_s=duration,
        output_tokens=tokens,
        output_tokens_per_s=tokens / duration if duration > 0 else 0.0,
        requests_per_s=len(ok) / duration if duration > 0 else 0.0,
        mean_prompt_tokens=sum(prompts) / len(prompts) if prompts else None,
        mean_output_tokens=tokens / len(ok) if ok else None,
        short_outputs=sum(r.output_tokens != r.expected_tokens for r in ok),
        tokens_per_chunk=tokens / chunks if chunks else None,
        tpot_ms_mean=1000 * sum(tpot) / len(tpot) if tpot else None,
        server_tpot_ms=sum(server_tpot) / len(server_tpot) if server_tpot else None,
        error_samples=sorted({r.error for r in results if r.error})[:5],
    )
    samples = {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "itl": [gap for r in ok for gap in r.itl],
        "e2e": [r.end - r.start for r in ok],
    }
    for name, values in samples.items():
        for q in PERCENTILES:
            p = percentile(values, q)
            setattr(row, f"{name}_ms_p{q}", None if p is None else 1000 * p)
    return row


def step_histograms(text: str) -> StepSums:
    """A /metrics exposition -> the sums and counts of its histograms about engine steps, in seconds."""
    out: StepSums = {}
    for name, labels, value in Scrape.parse(text).samples:
        if "step" not in name or "seconds" not in name:
            continue
        for suffix, slot in (("_sum", 0), ("_count", 1)):
            if name.endswith(suffix):
                shown = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
                key = (name[: -len(suffix)], f"{{{shown}}}" if shown else "")
                out.setdefault(key, [0.0, 0.0])[slot] = value
    return out


def step_time(before: StepSums, after: StepSums) -> tuple[float | None, str | None]:
    """Mean step duration (ms) over a level from histogram deltas; a decode-only series if there is one."""
    deltas = {
        key: (a[0] - before.get(key, [0.0, 0.0])[0], a[1] - before.get(key, [0.0, 0.0])[1])
        for key, a in after.items()
    }
    usable = {k: v for k, v in deltas.items() if v[1] > 0}
    if not usable:
        return None, None
    key = next((k for k in usable if "decode" in k[0] + k[1]), None) or sorted(usable)[0]
    total, count = usable[key]
    return 1000 * total / count, f"/metrics {key[0]}{key[1]} (mean)"


async def server_state(client: httpx.AsyncClient) -> tuple[StepSums, int | None]:
    hist: StepSums = {}
    steps = None
    with contextlib.suppress(httpx.HTTPError, ValueError):
        r = await client.get("/metrics")
        if r.status_code == 200:
            hist = step_histograms(r.text)
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
        r = await client.get("/stats")
        if r.status_code == 200:
            steps = int(r.json()["steps"])
    return hist, steps
