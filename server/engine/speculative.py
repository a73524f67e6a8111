"""Speculative decoding: which rows of a decode step get proposed tokens, and how well they pay.

The n-gram proposer (vLLM's `ngram`, prompt lookup decoding) finds the longest suffix of a sequence
(`prompt_lookup_max` tokens down to `prompt_lookup_min`) that occurred earlier in its prompt or output,
and proposes the tokens that followed its latest earlier occurrence. The runner verifies them in one
decode-path forward (`InputBatch.prepare_verify`); the core emits the target model's own tokens up to
the first that differs from a proposal (`core.py`), so the output is exactly what decoding one token at
a time would give.

Speculation pays only when proposals are accepted and the step has compute to spare, so a row whose
proposals were mostly rejected lately rests for a while (MIN_ACCEPTANCE), and a step whose batch is
larger than `speculative_disable_by_batch_size`, or whose verify rows would not fit the largest
compiled decode bucket, decodes plainly. A draft model pays a forward per proposed token, so its
proposals are as long as each row's recent luck says (up to k).
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.tokenizer import Tokenizer
from server.engine.config import SPECULATIVE_METHODS, EngineConfig
from server.engine.draft import DraftProposer
from server.engine.kv_cache import BlockManager
from server.engine.scheduler import ScheduledStep
from server.engine.sequence import Sequence
from server.engine.structured import GrammarCompiler

MAX_SPECULATIVE_TOKENS = 16
WINDOW = 8
"""A row's recent history: its last WINDOW drafts."""
MIN_ACCEPTANCE = 0.2
"""A row whose last WINDOW drafts had fewer than this fraction of their tokens accepted rests: a
verify row costs about as much as a decode row, so a draft of k tokens that yields fewer than
k * 0.2 accepted ones costs more than it saves once the batch is compute-bound."""
REST_STEPS = 32
"""Decode steps a resting row goes without proposals before it is given another chance."""


class NgramIndex:
    """One sequence's n-grams (`n_min` to `n_max` tokens), each with the latest position it ends at,
    kept as the sequence grows (its tokens are only ever appended).

    A lookup is then `n_max - n_min + 1` dictionary probes, whatever the sequence's length: 5 us a
    step against 48 us for a scan of the whole sequence (the README's prose, 384-512 tokens, n-grams
    of 2-5). A row whose lookups find nothing pays that on every step.
    """

    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max
        self._ends: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(n_min, n_max + 1)}
        self._indexed = 0
        """Positions below this have their n-grams in `_ends`."""

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """`k` tokens that followed the latest earlier occurrence of the longest matching suffix.

        A match close to the end has fewer than `k` tokens after it; the continuation then repeats with
        the period the match implies (a loop proposes its next turns).
        """
        length = len(tokens)
        # Every position but the last may end an earlier occurrence.
        for end in range(self._indexed, length - 1):
            for n in range(self.n_min, min(self.n_max, end + 1) + 1):
                self._ends[n][tuple(tokens[end - n + 1 : end + 1])] = end
        self._indexed = max(self._indexed, length - 1)
        for n in range(min(self.n_max, length - 1), self.n_min - 1, -1):
            end = self._ends[n].get(tuple(tokens[length - n :]))
            if end is not None:
                start = end + 1
                period = length - start
                proposal = tokens[start : start + k]
                while len(proposal) < k:
                    proposal.append(proposal[len(proposal) - period])
                return proposal
        return []


@dataclass
class _Row:
    """A sequence's recent drafts: (proposed, accepted) each, and the step it may speculate again."""

    drafts: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=WINDOW))
    rest_until: int = 0
    ngrams: NgramIndex | None = None
    """The n-gram proposer's index of the sequence, built at its first lookup."""
    length: int | None = None
    """How many tokens a draft model proposes for it next (None: k); see `Speculator.record`."""


@dataclass
class SpecCounters:
    """Totals since start, vLLM's spec_decode_* counters."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    emitted_tokens: int = 0


class Speculator:
    """Proposes tokens for the rows of a decode step and records what the verification accepted."""

    def __init__(
        self,
        config: EngineConfig,
        max_model_len: int,
        blocks: BlockManager,
        tokenizer: Tokenizer,
        device: torch.device,
    ) -> None:
        k = config.num_speculative_tokens
        method = config.speculative_method
        if method not in SPECULATIVE_METHODS:
            raise ValueError(
                f"--speculative-method must be one of {', '.join(SPECULATIVE_METHODS)}, got {method!r}"
            )
        if (method == "draft") != (config.speculative_model is not None):
            raise ValueError("--speculative-model goes with --speculative-method draft, and only with it")
        if config.deterministic:
            raise ValueError("--speculative-method cannot be combined with --deterministic")
        if not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"--num-speculative-tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], got {k}")
        if not 1 <= config.prompt_lookup_min <= config.prompt_lookup_max:
            raise ValueError(
                "--prompt-lookup-min must be at least 1 and at most --prompt-lookup-max, got "
                f"{config.prompt_lookup_min} and {config.prompt_lookup_max}"
            )
        if config.speculative_disable_by_batch_size < 1:
            raise ValueError(
                "--speculative-disable-by-batch-size must be at least 1, got "
                f"{config.speculative_disable_by_batch_size}"
            )
        self.k = k
        self.n_min, self.n_max = config.prompt_lookup_min, config.prompt_lookup_max
        self.max_batch = config.speculative_disable_by_batch_size
        self.max_rows = (k + 1) * min(self.max_batch, config.max_num_seqs)
        """Rows of the largest verify step: the runner compiles decode buckets up to it."""
        self.max_model_len = max_model_len
        self.blocks = blocks
        self.counters = SpecCounters()
        self._rows: weakref.WeakKeyDictionary[Sequence, _Row] = weakref.WeakKeyDictionary()
        self._steps = 0
        self.draft = None
        if config.speculative_model is not None:
            self.draft = DraftProposer(
                config.speculative_model,
                tokenizer,
                max_model_len,
                self.max_batch,
                blocks.block_size,
                config.dtype,
                device,
                config.enforce_eager,
            )

    @property
    def description(self) -> str:
        """What runs, for the start-up line."""
        if self.draft is not None:
            how = (
                f"draft model {self.draft.directory.name} ({self.draft.num_parameters / 1e6:.1f}M parameters)"
            )
        else:
            how = f"ngram (n-grams {self.n_min}-{self.n_max})"
        return f"speculative {how}, k={self.k}, off above {self.max_batch} sequences"

    def warm_up(self, progress: Callable[[str], None]) -> None:
        if self.draft is not None:
            self.draft.warm_up(progress)

    def release(self, seq: Sequence) -> None:
        """`seq` is done (finished or aborted): what the proposer keeps for it goes."""
        if self.draft is not None:
            self.draft.release(seq)

    def propose(self, step: ScheduledStep) -> list[list[int]] | None:
        """Per sequence of a decode-only step (in its order), the tokens to verify ([]: none); None
        when no row speculates. Each proposing row's blocks are grown to hold its proposals."""
        self._steps += 1
        if len(step) > self.max_batch or not step.is_decode_only:
            return None
        if any(s.num_missing_tokens for s in step.sequences):
            return None
        rows: list[tuple[int, Sequence, int]] = []
        room = self.max_rows - len(step)
        for i, seq in enumerate(step.sequences):
            k = min(self._limit(seq), room)
            if k >= 1:
                rows.append((i, seq, k))
                room -= k
        if not rows:
            return None
        if self.draft is not None:
            found = self.draft.propose([(seq, k) for _, seq, k in rows])
        else:
            found = [self._ngrams(seq).propose(seq.token_ids, k) for _, seq, k in rows]
        proposals: list[list[int]] = [[] for _ in step.sequences]
        for (i, seq, _), proposal in zip(rows, found, strict=True):
            if seq.matcher is not None:  # a constrained row verifies only what its grammar allows
                proposal = GrammarCompiler.valid_prefix(seq.matcher, proposal)
            if proposal and self.blocks.allocate(seq, seq.num_computed_tokens + len(proposal)):
                proposals[i] = proposal
        return proposals if any(proposals) else None

    def _row(self, seq: Sequence) -> _Row:
        """`seq`'s row, made at first use (not `setdefault`, which would build one every call)."""
        row = self._rows.get(seq)
        if row is None:
            row = self._rows[seq] = _Row()
        return row

    def _ngrams(self, seq: Sequence) -> NgramIndex:
        row = self._row(seq)
        if row.ngrams is None:
            row.ngrams = NgramIndex(self.n_min, self.n_max)
        return row.ngrams

    def _limit(self, seq: Sequence) -> int:
        """How many tokens `seq` may have proposed now (0: none)."""
        row = self._rows.get(seq)
        if row is not None and row.rest_until > self._steps:
            return 0
        # The last emitted token may finish the sequence; proposing past that is wasted work.
        return min(
            self.k if row is None or row.length is None else row.length,
            seq.request.max_tokens - seq.num_output_tokens - 1,
            self.max_model_len - seq.num_tokens,
        )

    def record(self, seq: Sequence, proposed: int, accepted: int, emitted: int) -> None:
        """The verification of one row's `proposed` tokens accepted `accepted` and emitted `emitted`."""
        c = self.counters
        c.drafts += 1
        c.draft_tokens += proposed
        c.accepted_tokens += accepted
        c.emitted_tokens += emitted
        row = self._row(seq)
        row.drafts.append((proposed, accepted))
        if self.draft is not None:
            # Each token a draft model proposes costs one of its forwards, and the verify rows grow
            # with them: after a miss it proposes one more than were accepted, after a full hit twice as
            # many (up to k), so a row whose drafts fail pays for one draft token a step, not k.
            row.length = min(self.k, 2 * proposed if accepted == proposed else accepted + 1)
        if len(row.drafts) == WINDOW:
            total = sum(p for p, _ in row.drafts)
            if sum(a for _, a in row.drafts) < MIN_ACCEPTANCE * total:
                row.rest_until = self._steps + REST_STEPS + 1  # the first step it may propose in
                row.drafts.clear()
