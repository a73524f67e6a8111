"""Turns a scheduled step into one batched forward and returns the logits to sample from.

All decode rows (one new token each) form a single attention group; each prefill chunk is a group
of its own. Every linear layer sees the whole step's tokens at once, so a prefill chunk rides along
with the decodes on the same weight reads. Only the last computed token of a sequence that has
caught up gets logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.transformer import AttentionGroup, CacheBatch, KVCache, Transformer
from server.engine.scheduler import ScheduledStep
from server.engine.sequence import Sequence


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        block_size: int,
        device: torch.device,
        deterministic: bool,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.cache = cache
        self.block_size = block_size
        self.device = device
        self.deterministic = deterministic
        self.dtype = model.embed_tokens.weight.dtype
        model.pack_linears()
        if compile:
            model.compile_dense()

    def _slots(self, block_tables: Tensor, length: int) -> Tensor:
        """[rows, length] cache slots of positions 0..length-1 of each row's block table."""
        pos = torch.arange(length, device=self.device)
        return block_tables[:, pos // self.block_size] * self.block_size + pos % self.block_size

    def _additive(self, visible: Tensor) -> Tensor:
        """Float mask (0 where visible, -inf elsewhere) in the model's dtype: SDPA would otherwise
        convert a boolean mask in every layer."""
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~visible, float("-inf"))

    def _table(self, seqs: list[Sequence], length: int) -> Tensor:
        width = -(-length // self.block_size)
        rows = [s.block_table[:width] + [0] * (width - len(s.block_table[:width])) for s in seqs]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _build(self, seqs: list[Sequence], counts: list[int]) -> tuple[Tensor, Tensor, CacheBatch, list[int]]:
        """Flat tokens, positions and the CacheBatch for `seqs` (decodes must come first)."""
        bs = self.block_size
        tokens: list[int] = []
        positions: list[int] = []
        writes: list[int] = []
        groups: list[AttentionGroup] = []
        last_rows: list[int] = []
        arange = torch.arange
        decodes = seqs[: sum(1 for n in counts if n == 1)]
        if decodes:
            for s in decodes:
                p = s.num_computed_tokens
                tokens.append(s.token_ids[p])
                positions.append(p)
                writes.append(s.block_table[p // bs] * bs + p % bs)
            kv_len = max(positions) + 1
            last = torch.tensor(positions, device=self.device)
            visible = arange(kv_len, device=self.device)[None, :] <= last[:, None]
            # Past its own length a row reads the null block: stale slots are never touched.
            read = self._slots(self._table(decodes, kv_len), kv_len) * visible
            mask = self._additive(visible)[:, None, None, :]
            groups.append(AttentionGroup(0, len(decodes), 1, kv_len, read.flatten(), mask))
            last_rows.extend(range(len(decodes)))
        for s, n in zip(seqs[len(decodes) :], counts[len(decodes) :], strict=True):
            start, kv_len = s.num_computed_tokens, s.num_computed_tokens + n
            first = len(tokens)
            tokens.extend(s.token_ids[start:kv_len])
            positions.extend(range(start, kv_len))
            writes.extend(s.block_table[p // bs] * bs + p % bs for p in range(start, kv_len))
            read = self._slots(self._table([s], kv_len), kv_len)
            q_pos = arange(start, kv_len, device=self.device)
            visible = arange(kv_len, device=self.device)[None, :] <= q_pos[:, None]
            mask = self._additive(visible)[None, None]
            groups.append(AttentionGroup(first, 1, n, kv_len, read.flatten(), mask))
            last_rows.append(len(tokens) - 1)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        batch = CacheBatch(write_slots=as_tensor(writes), groups=groups)
        return as_tensor(tokens), as_tensor(positions), batch, last_rows

    def _order(self, step: ScheduledStep) -> list[int]:
        """Step indices in the order the flat batch lays them out: decodes first, then chunks."""
        decodes = [i for i, n in enumerate(step.num_tokens) if n == 1]
        return decodes + [i for i, n in enumerate(step.num_tokens) if n > 1]

    @torch.inference_mode()
    def execute(self, step: ScheduledStep) -> tuple[list[Sequence], Tensor | None]:
        """Run the step; return the sequences that caught up (in row order) and their logits."""
        if self.deterministic:
            return self._execute_one_by_one(step)
        order = self._order(step)
        seqs = [step.sequences[i] for i in order]
        counts = [step.num_tokens[i] for i in order]
        tokens, positions, batch, last_rows = self._build(seqs, counts)
        ready = [
            i
            for i, (s, n) in enumerate(zip(seqs, counts, strict=True))
            if s.num_computed_tokens + n == s.num_tokens
        ]
        for s, n in zip(seqs, counts, strict=True):
            s.num_computed_tokens += n
        if not ready:
            self.model(tokens, positions, self.cache, batch, logits_indices=tokens[:0])
            return [], None
        idx = torch.tensor([last_rows[i] for i in ready], dtype=torch.long, device=self.device)
        logits = self.model(tokens, positions, self.cache, batch, logits_indices=idx)
        return [seqs[i] for i in ready], logits

    def _execute_one_by_one(self, step: ScheduledStep) -> tuple[list[Sequence], Tensor | None]:
        """Batch-invariant mode: each sequence runs alone, so its numbers never depend on the batch."""
        ready: list[Sequence] = []
        logits: list[Tensor] = []
        for seq, n in zip(step.sequences, step.num_tokens, strict=True):
            tokens, positions, batch, last_rows = self._build([seq], [n])
            caught_up = seq.num_computed_tokens + n == seq.num_tokens
            seq.num_computed_tokens += n
            idx = torch.tensor(last_rows if caught_up else [], dtype=torch.long, device=self.device)
            out = self.model(tokens, positions, self.cache, batch, logits_indices=idx)
            if caught_up:
                ready.append(seq)
                logits.append(out)
        return ready, (torch.cat(logits) if logits else None)
