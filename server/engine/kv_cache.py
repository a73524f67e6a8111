"""The KV cache: tensors allocated once, and the accounting of their blocks.

The cache is `num_blocks * block_size` token slots per layer. A sequence owns a list of blocks
(its block table); token position p lives in slot `table[p // block] * block + p % block`.
Full blocks are content-addressed by a hash chain over their tokens, so a later prompt with the
same prefix reuses them (prefix caching). A block nobody references stays findable by its hash
until it is handed out again, least recently freed first.

Block 0 is never handed out: it stays zero and is what padding reads. A masked score still
multiplies its value (0 * NaN is NaN), so padding must point at finite numbers.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

from model.config import ModelConfig
from server.engine.sequence import Sequence


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element


def allocate_cache(
    config: ModelConfig, num_slots: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of shape [num_slots, kv_heads, head_dim], checked against free memory."""
    need = num_slots * kv_bytes_per_token(config, dtype)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > 0.9 * free:
        raise ValueError(
            f"KV cache of {num_slots} tokens needs {need / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB "
            "is free: lower --kv-cache-tokens or --kv-cache-memory"
        )
    shape = (num_slots, config.num_key_value_heads, config.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(config.num_hidden_layers)
    ]


class BlockManager:
    """Hands out cache blocks to sequences; pure bookkeeping, never touches a tensor."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.num_blocks = num_blocks
        """Usable blocks, not counting the null block 0."""
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * (num_blocks + 1)
        self.block_hash: list[int | None] = [None] * (num_blocks + 1)
        self.cached: dict[int, int] = {}
        # Unreferenced blocks, oldest first: the front is evicted first, cached content or not.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks + 1))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs to hold its first `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.block_hash[block]
        if old is not None:
            del self.cached[old]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s block table to cover `num_tokens` tokens; False (and no change) if full."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free):
            return False
        seq.block_table.extend(self._take() for _ in range(need))
        return True

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks `seq` holds beyond its first `num_tokens` tokens (rejected proposals').

        Only blocks past every computed token go: none of them is published under a hash.
        """
        keep = -(-num_tokens // self.block_size)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:  # nothing cached in it: handed out before cached blocks
                self.free[block] = None
                self.free.move_to_end(block, last=False)

    def _chain(self, parent: int | None, tokens: list[int]) -> int:
        return hash((parent, tuple(tokens)))

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks holding a prefix of `seq`'s tokens; return how many tokens they cover.

        At least one token is always left to compute, so the step that computes it yields logits. A
        sequence that must score its prompt reads nothing: a cached position has no logits to score
        with (its own blocks are still published for later prompts).
        """
        if not self.enable_prefix_caching or seq.block_table or seq.needs_prompt_logits:
            return 0
        bs = self.block_size
        limit = (seq.num_tokens - 1) // bs
        parent: int | None = None
        for i in range(limit):
            h = self._chain(parent, seq.token_ids[i * bs : (i + 1) * bs])
            block = self.cached.get(h)
            if block is None:
                break
            self._ref(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed_tokens = len(seq.block_table) * bs
        return seq.num_computed_tokens

    def share_prefix(self, source: Sequence, seq: Sequence) -> int:
        """Give `seq` the full, computed blocks of `source` (which has the same prompt): n > 1 choices.

        The partial last block is not shared: `seq` recomputes those few tokens into its own block.
        """
        full = min(source.num_computed_tokens, seq.num_tokens - 1) // self.block_size
        for block in source.block_table[:full]:
            self._ref(block)
        seq.block_table = source.block_table[:full]
        seq.block_hashes = source.block_hashes[:full]
        seq.num_computed_tokens = full * self.block_size
        return seq.num_computed_tokens

    def register_computed(self, seq: Sequence) -> None:
        """Publish `seq`'s newly completed blocks under their chain hashes for later prompts."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = self._chain(parent, seq.token_ids[i * bs : (i + 1) * bs])
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached and self.block_hash[block] is None:
                self.cached[h] = block
                self.block_hash[block] = h

    def forget(self, seq: Sequence) -> None:
        """Unpublish `seq`'s blocks: their content is suspect and must not serve later prompts."""
        for block in seq.block_table:
            h = self.block_hash[block]
            if h is not None:
                del self.cached[h]
                self.block_hash[block] = None

    def release(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks nobody uses go back to the free list (newest last)."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
