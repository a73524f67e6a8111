"""BlockManager without a model: allocation, the prefix hash chain, reference counts, freeing, and the
null block 0, which padding reads and which is never handed out."""

from __future__ import annotations

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.kv_cache import BlockManager
from server.engine.outputs import Timings
from server.engine.params import SamplingParams
from server.engine.sequence import Request, Sequence

BS = 4


def make_seq(token_ids: list[int]) -> Sequence:
    request = Request("r", list(token_ids), SamplingParams(), 16, None, Timings(0.0))
    return Sequence(request, 0, list(token_ids), IncrementalDetokenizer([], ()))


def computed(blocks: BlockManager, token_ids: list[int]) -> Sequence:
    """A sequence whose tokens all sit in the cache and are published, as after its prefill."""
    seq = make_seq(token_ids)
    assert blocks.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    blocks.register_computed(seq)
    return seq


def test_allocation_grows_by_whole_blocks_and_never_hands_out_block_0() -> None:
    blocks = BlockManager(num_blocks=6, block_size=BS, enable_prefix_caching=True)
    seq = make_seq(list(range(10)))
    assert blocks.blocks_needed(seq, 5) == 2
    assert blocks.allocate(seq, 5) and len(seq.block_table) == 2
    assert blocks.allocate(seq, 8) and len(seq.block_table) == 2  # still fits: nothing new
    assert blocks.allocate(seq, 9) and len(seq.block_table) == 3
    others = [make_seq([1]) for _ in range(3)]
    for other in others:
        assert blocks.allocate(other, 1)
    assert blocks.num_free_blocks == 0 and blocks.num_used_blocks == 6
    handed_out = seq.block_table + [b for o in others for b in o.block_table]
    assert sorted(handed_out) == [1, 2, 3, 4, 5, 6]  # every usable block once; never 0


def test_a_failed_allocation_changes_nothing() -> None:
    blocks = BlockManager(num_blocks=2, block_size=BS, enable_prefix_caching=True)
    seq = make_seq(list(range(12)))
    assert blocks.allocate(seq, 4)
    table = list(seq.block_table)
    assert not blocks.allocate(seq, 12)  # needs 2 more, 1 is free
    assert seq.block_table == table and blocks.num_free_blocks == 1


def test_release_frees_blocks_and_resets_progress() -> None:
    blocks = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=True)
    seq = computed(blocks, list(range(10)))
    assert blocks.num_free_blocks == 1
    blocks.release(seq)
    assert blocks.num_free_blocks == 4
    assert (seq.block_table, seq.block_hashes, seq.num_computed_tokens) == ([], [], 0)
    assert all(count == 0 for count in blocks.ref_counts)


def test_a_shared_prefix_is_attached_with_reference_counts() -> None:
    blocks = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    first = computed(blocks, list(range(12)))  # three full blocks, published
    assert len(first.block_hashes) == 3
    second = make_seq(list(range(8)) + [99, 98, 97])
    assert blocks.match_prefix(second) == 8  # the first two blocks; the third differs
    assert second.block_table == first.block_table[:2]
    assert second.num_computed_tokens == 8
    assert [blocks.ref_counts[b] for b in first.block_table] == [2, 2, 1]
    # Dropping one user keeps a shared block; dropping the last one frees it.
    blocks.release(first)
    assert [blocks.ref_counts[b] for b in second.block_table] == [1, 1]
    assert blocks.num_free_blocks == 8 - 2
    blocks.release(second)
    assert blocks.num_free_blocks == 8


def test_the_hash_chain_matches_only_whole_prefixes() -> None:
    """A block's hash covers every token before it: the same four tokens after a different prefix,
    or a different first block, match nothing."""
    blocks = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    computed(blocks, [1, 2, 3, 4, 5, 6, 7, 8, 0])
    moved = make_seq([5, 6, 7, 8, 1, 2, 3, 4, 0])  # the same blocks, swapped
    assert blocks.match_prefix(moved) == 0 and moved.block_table == []
    changed_first = make_seq([1, 2, 3, 9, 5, 6, 7, 8, 0])
    assert blocks.match_prefix(changed_first) == 0


def test_a_match_always_leaves_a_token_to_compute() -> None:
    """The step that computes the last prompt token yields the logits, so a fully cached prompt still
    recomputes its last block."""
    blocks = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    computed(blocks, list(range(8)))
    again = make_seq(list(range(8)))
    assert blocks.match_prefix(again) == 4 and again.num_missing_tokens == 4


def test_freed_blocks_stay_findable_until_reused_oldest_first() -> None:
    blocks = BlockManager(num_blocks=3, block_size=BS, enable_prefix_caching=True)
    old = computed(blocks, list(range(5)))  # block A (full, published) + a partial block
    blocks.release(old)
    hit = make_seq(list(range(5)))
    assert blocks.match_prefix(hit) == 4  # freed, but still cached
    blocks.release(hit)
    # Taking every free block reuses the cached one too, and its hash goes with it.
    filler = make_seq(list(range(100, 112)))
    assert blocks.allocate(filler, 12)
    blocks.release(filler)
    assert blocks.match_prefix(make_seq(list(range(5)))) == 0


def test_reuse_takes_the_least_recently_freed_block_first() -> None:
    blocks = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=True)
    a = computed(blocks, list(range(5)))  # blocks 1, 2
    b = computed(blocks, list(range(10, 15)))  # blocks 3, 4
    blocks.release(a)
    blocks.release(b)
    fresh = make_seq([50, 51, 52, 53, 54])
    assert blocks.allocate(fresh, 4)
    # a's blocks were freed first; b's cached prefix survives.
    assert fresh.block_table[0] in (1, 2)
    assert blocks.match_prefix(make_seq(list(range(10, 15)))) == 4


def test_n_choices_share_only_full_computed_blocks() -> None:
    blocks = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    source = computed(blocks, list(range(10)))  # 2 full blocks + 2 tokens in a third
    child = make_seq(list(range(10)))
    assert blocks.share_prefix(source, child) == 8
    assert child.block_table == source.block_table[:2] and child.num_missing_tokens == 2
    assert [blocks.ref_counts[b] for b in source.block_table] == [2, 2, 1]


def test_forgotten_blocks_serve_no_later_prompt() -> None:
    blocks = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    suspect = computed(blocks, list(range(9)))
    blocks.forget(suspect)
    assert blocks.match_prefix(make_seq(list(range(9)))) == 0


def test_without_prefix_caching_nothing_is_published_or_matched() -> None:
    blocks = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    first = computed(blocks, list(range(9)))
    assert first.block_hashes == []
    assert blocks.match_prefix(make_seq(list(range(9)))) == 0
