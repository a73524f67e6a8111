"""Drive the synchronous engine core directly: deterministic, fast, no threads."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.engine.core import LLMEngine
from server.engine.outputs import Delta, EngineError, Finished, Timings
from server.engine.params import SamplingParams
from server.engine.sequence import Request
from server.engine.structured import CompiledGrammar


@dataclass
class Result:
    request: Request
    deltas: list[Delta] = field(default_factory=list)
    finished: Finished | None = None
    error: EngineError | None = None

    def tokens(self, index: int = 0) -> list[int]:
        return [t for d in self.deltas if d.index == index for t in d.token_ids]

    def text(self, index: int = 0) -> str:
        return "".join(d.text for d in self.deltas if d.index == index)

    def finish_reason(self, index: int = 0) -> str | None:
        return next((d.finish_reason for d in self.deltas if d.index == index and d.finish_reason), None)


def submit(
    engine: LLMEngine, prompt_ids: list[int], params: SamplingParams, grammar: CompiledGrammar | None = None
) -> Result:
    request = Request(
        request_id="test",
        prompt_ids=list(prompt_ids),
        params=params,
        max_tokens=engine.validate(prompt_ids, params),
        sink=None,
        timings=Timings(arrival=time.monotonic()),
        grammar=grammar,
    )
    engine.add(request)
    return Result(request)


def run(
    engine: LLMEngine,
    results: list[Result],
    arrivals: dict[int, list[tuple[list[int], SamplingParams]]] | None = None,
    max_steps: int = 10_000,
    on_step: Callable[[int], None] | None = None,
) -> list[Result]:
    """Step until idle; `arrivals[k]` are submitted before step k (requests joining mid-flight)."""
    by_request = {id(r.request): r for r in results}
    arrivals = dict(arrivals or {})
    for step in range(max_steps):
        for prompt, params in arrivals.pop(step, []):
            r = submit(engine, prompt, params)
            results.append(r)
            by_request[id(r.request)] = r
        if not engine.has_work and not arrivals:
            return results
        if on_step:
            on_step(step)
        for request, item in engine.step():
            r = by_request[id(request)]
            if isinstance(item, Delta):
                r.deltas.append(item)
            elif isinstance(item, Finished):
                r.finished = item
            else:
                r.error = item
    raise AssertionError("engine did not finish in the step bound")
