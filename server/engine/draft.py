"""The draft-model proposer: a smaller checkpoint with the same tokenizer proposes up to k tokens greedily.

It has its own model, KV cache, block manager and runner (the same classes as the target's), and one
shadow sequence per target sequence it proposes for. Each speculative step, every shadow catches up
with its target's tokens (the tokens it computed that the target did not accept are recomputed: its
cache is rolled back by lowering `num_computed_tokens`) in the first of k draft decode steps, batched
over the rows and run on the compiled decode path, that append its greedy tokens. Greedy proposals
are one token for certain, so the core's acceptance rule stays exact (see `core.LLMEngine._verify`).

The draft cache holds a few sequences; when it is full, the shadows of sequences not in the step
give their blocks back (least recently used first) and prefill again if they speculate later.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from model.checkpoint import load_model
from model.tokenizer import Tokenizer
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.kv_cache import BlockManager, allocate_cache
from server.engine.outputs import Timings
from server.engine.params import SamplingParams
from server.engine.runner import ModelRunner
from server.engine.scheduler import ScheduledStep
from server.engine.sequence import Request, Sequence

CATCH_UP_ROWS = 2
"""Most tokens a shadow computes in a step through the compiled decode buckets (see `_forward`)."""


@dataclass
class _Shadow:
    seq: Sequence
    """The draft's own sequence: the target's tokens so far, then its proposals."""
    synced: int = 0
    """How many of the target's tokens it held at the last step (those never change)."""


class DraftProposer:
    def __init__(
        self,
        directory: Path,
        target: Tokenizer,
        max_model_len: int,
        max_batch: int,
        block_size: int,
        dtype: str | None,
        device: torch.device,
        enforce_eager: bool,
    ) -> None:
        self.directory = directory
        tokenizer = Tokenizer.load(directory)
        if tokenizer.token_bytes != target.token_bytes or tokenizer.to_json() != target.to_json():
            raise ValueError(
                f"--speculative-model {directory}: its tokenizer is not the served model's "
                "(a draft model must share the vocabulary)"
            )
        self.model = load_model(directory, dtype=dtype, device=device)
        self.vocab = target.vocab_size
        if self.model.config.vocab_size < self.vocab:
            raise ValueError(
                f"--speculative-model {directory}: vocabulary of {self.model.config.vocab_size} tokens, "
                f"the tokenizer has {self.vocab}"
            )
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        self.max_model_len = min(max_model_len, self.model.config.max_position_embeddings)
        # Room for every sequence of a speculating batch at full length, and one more.
        per_seq = -(-self.max_model_len // block_size) + 1
        num_blocks = (max_batch + 1) * per_seq
        cache = allocate_cache(self.model.config, (num_blocks + 2) * block_size, self.model.dtype, device)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(
            self.model,
            cache,
            block_size=block_size,
            sink_slot=(num_blocks + 1) * block_size,
            max_num_seqs=CATCH_UP_ROWS * max_batch,
            max_model_len=self.max_model_len,
            device=device,
            deterministic=False,
            enforce_eager=enforce_eager,
        )
        self._request = Request("draft", [0], SamplingParams(), 0, None, Timings(0.0))
        self._shadows: OrderedDict[Sequence, _Shadow] = OrderedDict()
        """By target sequence, least recently used first."""

    def warm_up(self, progress: Callable[[str], None]) -> None:
        self.runner.warm_up(lambda message: progress(f"draft model: {message}"))

    def release(self, seq: Sequence) -> None:
        """`seq` finished or was aborted: its shadow's blocks go back."""
        shadow = self._shadows.pop(seq, None)
        if shadow is not None:
            self.blocks.release(shadow.seq)

    def _shadow(self, seq: Sequence) -> _Shadow:
        shadow = self._shadows.get(seq)
        if shadow is None:
            empty = IncrementalDetokenizer([], ())
            shadow = _Shadow(Sequence(self._request, 0, list(seq.token_ids), empty))
            self._shadows[seq] = shadow
        self._shadows.move_to_end(seq)
        own = shadow.seq
        # Keep what it computed of the target's tokens; its proposals the target did not take go.
        tokens = seq.token_ids
        same = shadow.synced
        while same < min(len(own.token_ids), len(tokens)) and own.token_ids[same] == tokens[same]:
            same += 1
        own.token_ids = list(tokens)
        own.num_computed_tokens = min(own.num_computed_tokens, same)
        shadow.synced = len(tokens)
        return shadow

    def _reserve(self, own: Sequence, tokens: int, keep: set[Sequence]) -> bool:
        """Blocks for `tokens` tokens of `own`, evicting shadows not in this step if needed."""
        while not self.blocks.allocate(own, tokens):
            victim = next(
                (s for s in self._shadows if s not in keep and self._shadows[s].seq.block_table), None
            )
            if victim is None:
                return False
            self.blocks.release(self._shadows[victim].seq)
        return True

    @torch.inference_mode()
    def propose(self, rows: list[tuple[Sequence, int]]) -> list[list[int]]:
        """Up to `k` greedy draft tokens for each (sequence, k) row."""
        keep = {seq for seq, _ in rows}
        active: list[tuple[int, Sequence, int]] = []
        for i, (seq, k) in enumerate(rows):
            if seq.num_tokens + k > self.max_model_len:
                continue
            own = self._shadow(seq).seq
            if self._reserve(own, own.num_tokens + k - 1, keep):
                active.append((i, own, k))
        proposals: list[list[int]] = [[] for _ in rows]
        for j in range(max((k for _, _, k in active), default=0)):
            live = [(i, own) for i, own, k in active if k > j]
            ready, logits = self._forward([own for _, own in live])
            tokens = logits[:, : self.vocab].max(dim=-1).indices.tolist()
            token_of = {id(own): t for own, t in zip(ready, tokens, strict=True)}
            for i, own in live:
                own.token_ids.append(token_of[id(own)])
                proposals[i].append(token_of[id(own)])
        return proposals

    def _forward(self, shadows: list[Sequence]) -> tuple[list[Sequence], Tensor]:
        """Compute every shadow's missing tokens; its last one's logits, a row per shadow.

        After a verification a shadow misses one token (a proposal was rejected: the target's own
        token replaces it) or two (all were accepted: the last proposal and the target's next). Such
        steps run as a verify step of the compiled decode buckets, the tokens after each shadow's
        first missing one laid out as its "proposals". A plain decode step takes the decode fast
        path, and a step where a shadow misses more (its prompt) the general path.
        """
        step = ScheduledStep()
        missing = [own.num_missing_tokens for own in shadows]
        if max(missing) == 1 or max(missing) > CATCH_UP_ROWS or sum(missing) > self.runner.buckets[-1]:
            for own, n in zip(shadows, missing, strict=True):
                step.add(own, n)
            ready, logits, _, _ = self.runner.execute(step)
            assert logits is not None
            return ready, logits
        for own in shadows:
            step.add(own, 1)
        known = [
            own.token_ids[own.num_computed_tokens : own.num_computed_tokens + n - 1]
            for own, n in zip(shadows, missing, strict=True)
        ]
        ready, logits, _, _ = self.runner.execute(step, known)
        last = torch.tensor(list(itertools.accumulate(missing)), device=logits.device) - 1
        for own, tokens in zip(shadows, known, strict=True):
            own.num_computed_tokens += len(tokens)
        return ready, logits[last]
