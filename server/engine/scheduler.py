"""Who runs this step, and how many tokens each computes. Pure Python: no tensors, no model.

The scheduler owns progress (vLLM v1 style): scheduling `n` tokens of a sequence advances its
`num_computed_tokens` by `n` at once, so the runner only reads where each sequence stands.

Every step: running sequences first (decodes need one token; a sequence still prefilling gets the
next chunk), then waiting ones are admitted while the batch, the prefill budget and the cache
allow. When the cache cannot grow a running sequence, the most recently admitted one is
preempted: its blocks are freed and it waits to be recomputed (its output so far is kept).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from server.engine.kv_cache import BlockManager
from server.engine.sequence import Sequence, Status


@dataclass
class ScheduledStep:
    sequences: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    """Tokens each sequence computes this step; they end at its (already advanced) num_computed_tokens."""
    preempted: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.num_tokens)

    def add(self, seq: Sequence, n: int) -> None:
        seq.num_computed_tokens += n
        self.sequences.append(seq)
        self.num_tokens.append(n)


class Scheduler:
    def __init__(
        self, blocks: BlockManager, max_num_seqs: int, prefill_chunk_tokens: int, aligned_chunks: bool
    ) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.aligned_chunks = aligned_chunks
        """Deterministic mode: chunk boundaries at fixed multiples, whatever else shares the step."""
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefix_hit_tokens = 0
        """Prompt tokens whose keys and values came from the prefix cache instead of being computed."""

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = Status.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of the queues (finished or aborted) and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:  # a held-back choice, or one whose admission failed, is in no queue
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        self.blocks.release(seq)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        missing = seq.num_missing_tokens
        if missing == 1:
            return 1
        if self.aligned_chunks:
            to_boundary = self.prefill_chunk_tokens - seq.num_computed_tokens % self.prefill_chunk_tokens
            return min(missing, to_boundary)
        return min(missing, budget)

    def _preempt(self, seq: Sequence, step: ScheduledStep) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        self.add(seq, front=True)
        step.preempted.append(seq)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        budget = self.prefill_chunk_tokens
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            if seq.num_missing_tokens > 1 and budget <= 0 and not self.aligned_chunks:
                continue
            n = self._chunk(seq, budget)
            while not self.blocks.allocate(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim, step)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            if n > 1:
                budget -= n
            step.add(seq, n)

        # Only running sequences hold blocks: one that cannot be admitted gives back what it matched
        # (still findable by hash), so a queue of waiters can never wedge the cache.
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            hit = 0 if seq.block_table else self.blocks.match_prefix(seq)
            n = self._chunk(seq, budget)
            # Keep a block per running sequence in reserve so admissions do not force preemptions.
            needed = self.blocks.blocks_needed(seq, seq.num_tokens) + len(self.running)
            fits = needed <= self.blocks.num_free_blocks or not self.running
            if not (fits and self.blocks.allocate(seq, seq.num_computed_tokens + n)):
                self.blocks.release(seq)
                break
            self.prefix_hit_tokens += hit
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            budget -= n
            step.add(seq, n)
        return step
