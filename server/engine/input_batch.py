"""The running batch's persistent input tensors, one row per decoding sequence.

Allocated once at the largest bucket's size. A sequence keeps its row while it runs; when one leaves,
the last row moves into the hole, so rows 0..n-1 are always the batch. Each decode step writes only
what changed (the new token, its position and slot, a block-table entry when a block was added) into
numpy views of CPU tensors; on CUDA one copy per buffer moves them to the device, so the compiled step
(and its CUDA graph) always reads the same addresses. Rows past the batch are padding: token 0,
length 0, writing to a sink slot that no sequence owns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from server.engine.sequence import Sequence


class _Buffer:
    """A CPU tensor with a numpy view for cheap element writes, and its device twin."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        on_cpu = device.type == "cpu"
        self.cpu = torch.zeros(shape, dtype=dtype, pin_memory=not on_cpu and torch.cuda.is_available())
        self.np = self.cpu.numpy()
        self.device = self.cpu if on_cpu else torch.zeros(shape, dtype=dtype, device=device)

    def to_device(self, rows: int) -> Tensor:
        if self.device is not self.cpu:
            self.device[:rows].copy_(self.cpu[:rows], non_blocking=True)
        return self.device[:rows]


class InputBatch:
    def __init__(
        self, max_rows: int, max_blocks_per_seq: int, block_size: int, sink_slot: int, device: torch.device
    ) -> None:
        self.max_rows = max_rows
        self.block_size = block_size
        self.sink_slot = sink_slot
        self.token_ids = _Buffer((max_rows,), torch.long, device)
        self.positions = _Buffer((max_rows,), torch.long, device)
        self.slot_mapping = _Buffer((max_rows,), torch.long, device)
        self.seq_lens = _Buffer((max_rows,), torch.int32, device)
        self.block_tables = _Buffer((max_rows, max_blocks_per_seq), torch.int32, device)
        self.seqs: list[Sequence] = []
        """Row i holds seqs[i]."""
        self._row: dict[Sequence, int] = {}
        self._tables: list[list[int]] = []
        """Per row, the block-table list last copied; the block manager replaces it on preemption."""
        self._blocks_written: list[int] = []
        """Per row, how many entries of that list are in `block_tables` already (it only grows)."""
        self._clear_padding(0, max_rows)

    def _clear_padding(self, lo: int, hi: int) -> None:
        self.token_ids.np[lo:hi] = 0
        self.positions.np[lo:hi] = 0
        self.slot_mapping.np[lo:hi] = self.sink_slot
        self.seq_lens.np[lo:hi] = 0

    def _remove(self, seq: Sequence) -> None:
        row = self._row.pop(seq)
        last = len(self.seqs) - 1
        if row != last:
            moved = self.seqs[last]
            self.seqs[row] = moved
            self._row[moved] = row
            self._tables[row] = self._tables[last]
            self._blocks_written[row] = self._blocks_written[last]
            for buf in (self.token_ids, self.positions, self.slot_mapping, self.seq_lens, self.block_tables):
                buf.np[row] = buf.np[last]
        self.seqs.pop()
        self._tables.pop()
        self._blocks_written.pop()
        self._clear_padding(last, last + 1)

    def _add(self, seq: Sequence) -> None:
        self._row[seq] = len(self.seqs)
        self.seqs.append(seq)
        self._tables.append(seq.block_table)
        self._blocks_written.append(0)

    def update(self, seqs: list[Sequence]) -> None:
        """Make the rows hold exactly `seqs` (in any order): those gone leave, new ones join."""
        wanted = set(seqs)
        for seq in [s for s in self.seqs if s not in wanted]:
            self._remove(seq)
        for seq in seqs:
            if seq not in self._row:
                self._add(seq)

    def prepare_decode(self, rows: int) -> None:
        """Write each row's one new token (already counted in num_computed_tokens); pad to `rows`."""
        bs = self.block_size
        tables = self.block_tables.np
        for row, seq in enumerate(self.seqs):
            table = seq.block_table
            if self._tables[row] is not table:
                self._tables[row], self._blocks_written[row] = table, 0
            written = self._blocks_written[row]
            if written < len(table):
                tables[row, written : len(table)] = table[written:]
                self._blocks_written[row] = len(table)
            pos = seq.num_computed_tokens - 1
            self.token_ids.np[row] = seq.token_ids[pos]
            self.positions.np[row] = pos
            self.seq_lens.np[row] = pos + 1
            self.slot_mapping.np[row] = table[pos // bs] * bs + pos % bs
        self._clear_padding(len(self.seqs), rows)

    def prepare_verify(self, seqs: list[Sequence], proposals: list[list[int]], rows: int) -> int:
        """Lay out each sequence's new token and then its proposed ones as consecutive rows sharing its
        block table, each at its own position, so row j attends to rows < j of its sequence (the op
        writes every row's keys and values before attending). Pad to `rows`; return the rows used.

        The persistent one-row-per-sequence layout is lost: the next decode step rebuilds it.
        """
        self.seqs, self._row, self._tables, self._blocks_written = [], {}, [], []
        bs = self.block_size
        row = 0
        for seq, proposal in zip(seqs, proposals, strict=True):
            table = seq.block_table
            first = seq.num_computed_tokens - 1
            n = 1 + len(proposal)
            end = row + n
            self.block_tables.np[row:end, : len(table)] = table
            self.token_ids.np[row:end] = [seq.token_ids[first], *proposal]
            positions = range(first, first + n)
            self.positions.np[row:end] = positions
            self.seq_lens.np[row:end] = range(first + 1, first + n + 1)
            self.slot_mapping.np[row:end] = [table[p // bs] * bs + p % bs for p in positions]
            row = end
        self._clear_padding(row, rows)
        return row

    def device_tensors(self, rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """token ids, positions, slot mapping, block tables, sequence lengths of the first `rows` rows."""
        return (
            self.token_ids.to_device(rows),
            self.positions.to_device(rows),
            self.slot_mapping.to_device(rows),
            self.block_tables.to_device(rows),
            self.seq_lens.to_device(rows),
        )
