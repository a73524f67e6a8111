"""Structured output: grammars compiled once per distinct constraint, one matcher per sequence.

llguidance (a grammar engine vLLM also uses) compiles a JSON Schema, a regex, a list of choices or a
Lark/GBNF grammar against the model's own tokenizer. Compiling runs in a small thread pool, cached by
the constraint's text (bounded LRU), never on the event loop or the engine thread. Each constrained
sequence copies the compiled matcher (microseconds); every step, the rows about to sample get their
allowed-token bitmask (computed in a thread of its own, without the GIL, while the forward runs), the
sampler masks those rows' logits, and each matcher advances with its row's accepted token.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import llguidance as llg
import torch
from torch import Tensor

from server.engine.params import ParamError

log = logging.getLogger("server.engine")

KINDS = ("json_schema", "regex", "choice", "grammar")
CACHE_SIZE = 128
"""Compiled grammars kept (least recently used out first); one is kilobytes to megabytes."""
COMPILE_WORKERS = 2
JSON_OPTIONS = {"whitespace_flexible": False}
"""Compact JSON (`{"a":1}`, as OpenAI writes it): free whitespace lets a weak model pad forever."""
_LIMITS = llg.LLParserLimits(verbose_errors=False)  # llguidance's defaults bound each compile and step


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match: plain data, and the compile cache's key.

    `kind` is one of KINDS; `source` is the schema as JSON text, the regex, the choices as a JSON list,
    or the grammar (Lark, or GBNF as llama.cpp writes it). `param` names the request field it came from,
    for error messages only.
    """

    kind: str
    source: str
    param: str = field(default="response_format", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"constraint kind must be one of {KINDS}, got {self.kind!r}")


class CompiledGrammar:
    """A compiled constraint; `matcher()` gives each sequence its own state."""

    def __init__(self, constraint: Constraint, template: llg.LLMatcher, seconds: float) -> None:
        self.constraint = constraint
        self.seconds = seconds
        self._template = template

    def matcher(self) -> llg.LLMatcher:
        return self._template.deep_copy()


def check_json_schema(schema: Any, param: str) -> None:
    """A schema the JSON Schema metaschema rejects is a 400, not whatever the compiler makes of it."""
    if not isinstance(schema, dict):
        raise ParamError(param, f"{param}: a JSON Schema must be an object")
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except RecursionError:
        raise ParamError(param, f"{param}: the JSON Schema is nested too deeply") from None
    except jsonschema.SchemaError as exc:
        where = "/".join(map(str, exc.path))
        at = f" at {where}" if where else ""
        raise ParamError(param, f"{param}: invalid JSON Schema{at}: {exc.message}") from None


def grammar_text(constraint: Constraint) -> str:
    """The llguidance grammar of `constraint` (not compiled yet); ParamError for what cannot be one."""
    kind, source, param = constraint.kind, constraint.source, constraint.param
    if kind == "json_schema":
        try:
            check_json_schema(json.loads(source), param)
        except json.JSONDecodeError as exc:
            raise ParamError(param, f"{param}: the schema is not valid JSON ({exc})") from None
        return llg.LLMatcher.grammar_from_json_schema(source, defaults=JSON_OPTIONS)
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(source)
    if kind == "choice":
        return llg.grammar_from("choice", source)
    try:
        return llg.grammar_from("grammar", source)  # Lark as is; GBNF converted to Lark
    except ValueError as exc:
        raise ParamError(param, f"{param}: {exc}") from None


def _bitmask(rows: int, vocab_size: int) -> Tensor:
    """llguidance's mask layout: one bit per token, 32 to an int32 (llguidance.torch's, whose import
    would load torch's compiler for one decorator)."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


class GrammarCompiler:
    """Compiles constraints in a thread pool, caches them, and computes the batch's token bitmasks.

    Thread-safe: `submit` is called from the event loop, the pool runs the compiles, the engine thread
    calls `allowed_tokens`.
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: Iterable[int]) -> None:
        self.vocab_size = vocab_size
        self.error: str | None = None
        """Why structured output is unavailable for this tokenizer (None: it is available)."""
        self._tokenizer: llg.LLTokenizer | None = None
        try:
            self._tokenizer = llg.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=sorted(eos_ids))
        except Exception as exc:  # the Rust side raises bare exceptions for tokenizers it cannot read
            self.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("no structured output: llguidance cannot read the tokenizer (%s)", self.error)
        self._pool = ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="grammar")
        self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        self._cache: OrderedDict[Constraint, Future[CompiledGrammar]] = OrderedDict()
        self._lock = threading.Lock()
        self._bitmask = _bitmask(1, vocab_size)
        self._shifts = torch.arange(32, dtype=torch.int32)
        self.listeners: list[Callable[[float], None]] = []
        """Called with the seconds of each compile that ran (not of cache hits), from a pool thread."""

    def submit(self, constraint: Constraint) -> Future[CompiledGrammar]:
        """The compile of `constraint`: cached, in flight, or started now. Its exception is a ParamError."""
        with self._lock:
            future = self._cache.get(constraint)
            if future is not None:
                self._cache.move_to_end(constraint)
                return future
            future = self._pool.submit(self._compile, constraint)
            self._cache[constraint] = future
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return future

    def compile(self, constraint: Constraint) -> CompiledGrammar:
        """Synchronous `submit` (for callers that own no event loop)."""
        return self.submit(constraint).result()

    def _compile(self, constraint: Constraint) -> CompiledGrammar:
        if self._tokenizer is None:
            message = f"structured output is not available for this model's tokenizer: {self.error}"
            raise ParamError(constraint.param, message)
        started = time.perf_counter()
        try:
            matcher = llg.LLMatcher(self._tokenizer, grammar_text(constraint), log_level=0, limits=_LIMITS)
        except ParamError:
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # llguidance's ValueErrors and panics; a deep schema's RecursionError
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ParamError(constraint.param, f"{constraint.param}: {detail}") from None
        if matcher.is_error():
            what = "grammar" if constraint.kind == "grammar" else constraint.kind.replace("_", " ")
            message = matcher.get_error().strip()
            raise ParamError(constraint.param, f"{constraint.param}: this {what} cannot be used: {message}")
        seconds = time.perf_counter() - started
        for listener in self.listeners:
            try:
                listener(seconds)
            except Exception:  # a metrics glitch must not fail the compile
                log.exception("grammar compile listener failed")
        return CompiledGrammar(constraint, matcher, seconds)

    def start_masks(
        self, matchers: list[llg.LLMatcher], drafts: list[list[int]] | None = None
    ) -> Future[None]:
        """Compute the next-token bitmask of each of `matchers` in the mask thread, so that it overlaps
        the step's forward; `allowed_tokens` then waits for it. With `drafts` (speculative decoding:
        tokens the grammar accepts, see `valid_prefix`), matcher i also gets the mask after each of
        its draft tokens, in the rows that follow its own: the matcher consumes them, then rolls back.

        One matcher after another (each call releases the GIL): about 0.1-0.2 ms a row for a JSON
        Schema. llguidance's parallel executor measured slower here, its threads contending with
        torch's for two cores.
        """
        drafts = drafts or [[] for _ in matchers]
        rows = len(matchers) + sum(map(len, drafts))
        if self._bitmask.shape[0] < rows:
            self._bitmask = _bitmask(rows, self.vocab_size)
        bitmask = self._bitmask
        row_bytes = bitmask.shape[1] * bitmask.element_size()

        def fill() -> None:
            row = 0
            for matcher, draft in zip(matchers, drafts, strict=True):
                matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), row_bytes)
                for token in draft:
                    row += 1
                    matcher.consume_token(token)
                    matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), row_bytes)
                row += 1
                if draft:
                    matcher.rollback(len(draft))

        return self._mask_thread.submit(fill)

    @staticmethod
    def valid_prefix(matcher: llg.LLMatcher, tokens: list[int]) -> list[int]:
        """The longest prefix of `tokens` the grammar accepts from `matcher`'s state (left unchanged)."""
        return tokens[: matcher.validate_tokens(tokens)] if tokens else tokens

    def allowed_tokens(self, masks: Future[None], rows: list[int], device: torch.device) -> Tensor:
        """A [len(rows), vocab] boolean tensor: the tokens allowed in bitmask rows `rows`."""
        masks.result()
        bits = self._bitmask[rows].to(device, non_blocking=True)
        unpacked = (bits[:, :, None] >> self._shifts.to(device)) & 1
        return unpacked.bool().flatten(1)[:, : self.vocab_size]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._mask_thread.shutdown(wait=False, cancel_futures=True)


def describe_error(matcher: llg.LLMatcher) -> str:
    """One line on why a matcher refused a token (the message without llguidance's state dump)."""
    return matcher.get_error().split("\n<", 1)[0].strip()
