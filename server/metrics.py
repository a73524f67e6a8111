"""Prometheus metrics, in one place: names, buckets, and the registry each app serves at /metrics.

Names are vLLM's (`vllm:time_to_first_token_seconds` → `tinyserve_time_to_first_token_seconds`), so
dashboards written for it port with a change of prefix. Buckets start at 1 ms because a small model
on a CPU decodes a token in a few. Labels are bounded: finish reasons, outcomes, route templates and
status codes; never request ids, prompts or raw paths.

Only this module imports prometheus_client. The engine emits plain numbers (StepStats after each step,
EngineStats on demand, Timings in each Finished) and the HTTP layer hands them here. Each app owns a
`CollectorRegistry`, so several apps (tests) never share counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.outputs import EngineStats, StepStats, Timings

PREFIX = "tinyserve_"

# `_created` series double every counter and histogram for no dashboard's benefit (process-wide switch).
prometheus_client.disable_created_metrics()

TTFT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
)  # fmt: skip
"""1 ms (a cached prompt, a tiny model) to ten minutes (a long queue behind a CPU)."""
ITL_BUCKETS = (
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
REQUEST_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0,
)  # fmt: skip
"""End to end, queue, prefill and decode times of one request."""
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
COMPILE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""A regex compiles in well under a millisecond; a large JSON Schema in a second or more."""

FINISH_REASONS = ("stop", "length", "abort", "error")
"""Every value the finished_reason label takes; anything else is counted as "error"."""
STRUCTURED_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar", "tool_call")
"""Every value the structured-output `kind` label takes (server/api/structured.py and tools.py)."""
OUTCOMES = ("finished", "aborted", "failed")
"""How a started generation request ends: started_total = finished + aborted + failed."""


class _EngineGauges(Collector):
    """Queue lengths and KV use, read from `engine.stats()` when scraped, so they are never stale."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield GaugeMetricFamily(
            PREFIX + "num_requests_running", "Sequences in the running batch (prefilling or decoding).",
            value=s.running,
        )  # fmt: skip
        yield GaugeMetricFamily(
            PREFIX + "num_requests_waiting", "Sequences queued for admission.", value=s.waiting
        )
        yield GaugeMetricFamily(
            PREFIX + "kv_cache_usage_perc", "Fraction of the KV cache in use (1 = full).", value=s.kv_usage
        )
        # Speculative decoding (vLLM's spec_decode_* names); all 0 when it is off.
        for name, doc, value in (
            ("num_drafts", "sequence-steps verified with proposed tokens.", s.spec_drafts),
            ("num_draft_tokens", "tokens proposed.", s.spec_draft_tokens),
            ("num_accepted_tokens", "proposed tokens the model accepted.", s.spec_accepted_tokens),
            ("num_emitted_tokens", "tokens emitted by steps that verified proposals.", s.spec_emitted_tokens),
        ):
            doc = f"Speculative decoding: {doc}"
            yield CounterMetricFamily(f"{PREFIX}spec_decode_{name}", doc, value=value)
        yield GaugeMetricFamily(
            PREFIX + "spec_decode_mean_acceptance_length",
            "Speculative decoding: tokens emitted per verified draft, the bonus token included (1 + "
            "accepted / drafts, as vLLM defines it; 0 before the first draft).",
            value=1 + s.spec_accepted_tokens / s.spec_drafts if s.spec_drafts else 0.0,
        )


class Metrics:
    """Every metric of one app, and the calls that feed them. Thread-safe (the engine thread calls
    `observe_step`)."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = r = CollectorRegistry()

        def histogram(name: str, doc: str, buckets: Iterable[float]) -> Histogram:
            return Histogram(PREFIX + name, doc, buckets=tuple(buckets), registry=r)

        def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
            return Counter(PREFIX + name, doc, tuple(labels), registry=r)

        # Per engine request, when it finishes (one per prompt of a completions call).
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS)
        self.itl = histogram(
            "inter_token_latency_seconds", "Time between consecutive output tokens.", ITL_BUCKETS
        )
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", REQUEST_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduled.", REQUEST_BUCKETS)
        self.prefill = histogram(
            "request_prefill_time_seconds", "First scheduled to first token.", REQUEST_BUCKETS
        )
        self.decode = histogram("request_decode_time_seconds", "First token to last token.", REQUEST_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens_total", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens_total", "Tokens generated by finished requests.")
        self.cache_queries = counter(
            "prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache."
        )
        self.cache_hits = counter("prefix_cache_hits_total", "Prompt tokens found in the prefix cache.")
        self.finish_reasons = counter(
            "request_success_total", "Choices ended, by finish reason.", ["finished_reason"]
        )
        # Per HTTP generation request.
        self.started = counter("requests_started_total", "Generation requests handed to the engine.")
        self.ended = {
            outcome: counter(f"requests_{outcome}_total", f"Started generation requests {outcome}.")
            for outcome in OUTCOMES
        }
        self.http = counter(
            "http_responses_total", "HTTP responses by route template and status code.", ["route", "status"]
        )
        # Per engine step.
        self.batch = histogram(
            "decode_batch_size", "Sequences decoded together, per step that decodes.", BATCH_BUCKETS
        )
        self.step_time = histogram(
            "engine_step_duration_seconds", "Wall time of one engine step.", STEP_BUCKETS
        )
        self.preemptions = counter("num_preemptions_total", "Sequences preempted to free KV cache.")
        # Structured output.
        self.structured = counter(
            "structured_output_requests_total",
            "Generation requests constrained by a grammar (response_format, guided_*, forced tools).",
            ["kind"],
        )
        self.grammar_compile = histogram(
            "grammar_compile_seconds", "Time to compile a new grammar (cache hits excluded).", COMPILE_BUCKETS
        )
        for reason in FINISH_REASONS:  # present at 0 from the start, so rate() has a baseline
            self.finish_reasons.labels(reason)
        for kind in STRUCTURED_KINDS:
            self.structured.labels(kind)
        r.register(_EngineGauges(stats))

    def observe_step(self, step: StepStats) -> None:
        """An engine step listener: runs on the engine thread, so it only touches thread-safe metrics."""
        if step.decode_rows:
            self.batch.observe(step.decode_rows)
        self.step_time.observe(step.seconds)
        if step.preempted:
            self.preemptions.inc(step.preempted)

    def count_structured(self, kind: str) -> None:
        """A constrained request handed to the engine; `kind` is one of STRUCTURED_KINDS."""
        self.structured.labels(kind).inc()

    def observe_grammar_compile(self, seconds: float) -> None:
        """A compile listener: runs on a compile thread (Histogram is thread-safe)."""
        self.grammar_compile.observe(seconds)

    def count_tokens(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> None:
        """A request's usage, counted when it finishes: the counters add up to the usage clients saw."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.cache_queries.inc(prompt_tokens)
        self.cache_hits.inc(cached_tokens)

    def observe_timings(self, timings: Timings) -> None:
        """The latencies of one finished engine request (one per prompt of a completions call)."""
        self.queue.observe(timings.queue_time)
        arrival, scheduled = timings.arrival, timings.scheduled
        first, last = timings.first_token, timings.finished
        if first is not None:
            self.ttft.observe(first - arrival)
            if scheduled is not None:
                self.prefill.observe(first - scheduled)
        if last is not None:
            self.e2e.observe(last - arrival)
            if first is not None:
                self.decode.observe(last - first)
        times = timings.token_times
        for before, after in zip(times, times[1:], strict=False):
            self.itl.observe(after - before)

    def count_finish_reason(self, reason: str, count: int = 1) -> None:
        if count:
            self.finish_reasons.labels(reason if reason in FINISH_REASONS else "error").inc(count)

    def request_started(self) -> None:
        self.started.inc()

    def request_ended(self, outcome: str) -> None:
        """`outcome` is one of OUTCOMES."""
        self.ended[outcome].inc()

    def http_response(self, route: str, status: int) -> None:
        """`route` must be a route template (or one fixed value for unmatched paths), never a raw path."""
        self.http.labels(route, str(status)).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text format body and its content type."""
        return prometheus_client.generate_latest(self.registry), CONTENT_TYPE_LATEST
