"""BlockManager: reference counts, prefix caching, LRU eviction, all-or-nothing allocation."""

from __future__ import annotations

import itertools

from protocol.sampling import SamplingParams
from worker.engine.block_manager import BlockManager
from worker.engine.sequence import Sequence

BS = 4
_ids = itertools.count()


def make_seq(tokens: list[int], salt: str = "") -> Sequence:
    return Sequence(f"r{next(_ids)}", list(tokens), SamplingParams(), cache_salt=salt)


def prefill(bm: BlockManager, seq: Sequence) -> None:
    """What the scheduler and the engine do for one whole-prompt prefill step."""
    bm.get_computed_blocks(seq)
    assert bm.allocate_slots(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq, seq.num_computed_tokens)


def test_allocate_and_free_ref_counts() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(list(range(10)))
    assert bm.allocate_slots(seq, 10)
    assert len(seq.block_table) == 3  # ceil(10 / 4)
    assert bm.num_free_blocks == 5
    assert bm.usage == 3 / 8
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    # Growing within the last block needs no new block; crossing the boundary needs one.
    seq.num_computed_tokens = 10
    assert bm.allocate_slots(seq, 2) and len(seq.block_table) == 3
    assert bm.allocate_slots(seq, 3) and len(seq.block_table) == 4
    table = list(seq.block_table)
    bm.free(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    assert all(bm.blocks[b].ref_count == 0 for b in table)


def test_prefix_hit_shares_physical_blocks() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    prefix = list(range(100, 100 + 3 * BS))
    a = make_seq(prefix + [1, 2])
    prefill(bm, a)
    b = make_seq(prefix + [7, 8, 9])
    assert bm.get_computed_blocks(b) == 3 * BS
    assert b.num_cached_tokens == 3 * BS and b.num_computed_tokens == 3 * BS
    assert b.block_table == a.block_table[:3]
    assert all(bm.blocks[blk].ref_count == 2 for blk in b.block_table)
    assert bm.allocate_slots(b, b.num_tokens - b.num_computed_tokens)
    assert b.block_table[3] != a.block_table[3]
    assert (bm.prefix_queries_tokens, bm.prefix_hit_tokens) == (a.num_tokens + b.num_tokens, 3 * BS)
    # A diverging second block stops the match after the first.
    c = make_seq(prefix[:BS] + [0] * (2 * BS) + [5])
    assert bm.get_computed_blocks(c) == BS
    assert c.block_table == a.block_table[:1]


def test_different_cache_salt_does_not_share() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    tokens = list(range(3 * BS + 1))
    prefill(bm, make_seq(tokens, salt="tenant-a"))
    other = make_seq(tokens, salt="tenant-b")
    assert bm.get_computed_blocks(other) == 0 and other.block_table == []
    same = make_seq(tokens, salt="tenant-a")
    assert bm.get_computed_blocks(same) == 3 * BS


def test_never_caches_whole_sequence() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    tokens = list(range(3 * BS))  # exactly three full blocks
    prefill(bm, make_seq(tokens))
    again = make_seq(tokens)
    # All three blocks are cached, but the last must be recomputed so the model yields logits.
    assert bm.get_computed_blocks(again) == 2 * BS
    assert again.num_tokens - again.num_computed_tokens == BS


def test_free_undoes_prefix_hit() -> None:
    bm = BlockManager(num_blocks=6, block_size=BS)
    tokens = list(range(2 * BS + 1))
    first = make_seq(tokens)
    prefill(bm, first)
    bm.free(first)
    assert bm.num_free_blocks == 6
    seq = make_seq(tokens)
    assert bm.get_computed_blocks(seq) == 2 * BS
    assert bm.num_free_blocks == 4
    bm.free(seq)  # the scheduler's undo when the allocation after a hit fails
    assert bm.num_free_blocks == 6 and seq.block_table == [] and seq.num_computed_tokens == 0
    # Undone lookups do not count towards the hit rate; only the admitted first one did.
    assert bm.prefix_hit_tokens == 0
    assert bm.get_computed_blocks(make_seq(tokens)) == 2 * BS  # still findable


def test_lru_eviction_of_cached_free_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    old = make_seq(list(range(0, BS)) + [99])
    new = make_seq(list(range(50, 50 + BS)) + [99])
    prefill(bm, old)
    prefill(bm, new)
    old_block, new_block = old.block_table[0], new.block_table[0]
    bm.free(old)  # freed first: evicted first
    bm.free(new)
    assert bm.num_free_blocks == 4
    # Two uncached tail blocks are handed out first, then the oldest freed cached block.
    filler = make_seq(list(range(1000, 1000 + 3 * BS)))
    assert bm.allocate_slots(filler, 3 * BS)
    assert old_block in filler.block_table and new_block not in filler.block_table
    assert bm.blocks[old_block].hash is None  # reuse evicted its content
    assert bm.get_computed_blocks(make_seq(list(range(0, BS)) + [99])) == 0
    probe = make_seq(list(range(50, 50 + BS)) + [99])
    assert bm.get_computed_blocks(probe) == BS and probe.block_table == [new_block]


def test_free_releases_tail_before_prefix() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    seq = make_seq(list(range(3 * BS + 1)))
    bm.get_computed_blocks(seq)
    assert not bm.allocate_slots(seq, seq.num_tokens)  # 4 blocks do not fit
    assert bm.allocate_slots(seq, 3 * BS)
    seq.num_computed_tokens = 3 * BS
    bm.cache_full_blocks(seq, 3 * BS)
    first, _, last = seq.block_table
    bm.free(seq)
    grab = make_seq([1])
    assert bm.allocate_slots(grab, 1) and grab.block_table == [last]
    # The shared-prefix head block is still cached.
    assert bm.blocks[first].hash is not None


def test_allocation_is_all_or_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(list(range(3 * BS)))
    assert bm.allocate_slots(a, 3 * BS)
    b = make_seq(list(range(2 * BS)))
    assert not bm.can_allocate(b, 2 * BS)
    assert not bm.allocate_slots(b, 2 * BS)
    assert b.block_table == [] and bm.num_free_blocks == 1
    assert bm.can_allocate(b, BS) and bm.allocate_slots(b, BS)
    assert bm.num_free_blocks == 0


def test_duplicate_content_stays_uncached_and_frees_cleanly() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(2 * BS))
    # Both computed in the same step: neither saw the other's blocks at lookup time.
    a, b = make_seq(tokens + [1]), make_seq(tokens + [2])
    for s in (a, b):
        bm.get_computed_blocks(s)
        assert bm.allocate_slots(s, s.num_tokens)
    for s in (a, b):
        s.num_computed_tokens = s.num_tokens
        bm.cache_full_blocks(s, s.num_tokens)
    assert [bm.blocks[x].hash is not None for x in a.block_table[:2]] == [True, True]
    assert [bm.blocks[x].hash is None for x in b.block_table[:2]] == [True, True]
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8
    assert bm.get_computed_blocks(make_seq(tokens + [3])) == 2 * BS


def test_cache_full_blocks_during_decode() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(list(range(BS - 1)))
    prefill(bm, seq)  # no full block yet
    assert all(bm.blocks[b].hash is None for b in seq.block_table)
    seq.append_token(42)  # the sampled token completes the first block once computed
    assert bm.allocate_slots(seq, 1)
    seq.num_computed_tokens += 1
    bm.cache_full_blocks(seq, seq.num_computed_tokens)
    assert bm.blocks[seq.block_table[0]].hash is not None
    hit = make_seq(list(range(BS - 1)) + [42, 7])
    assert bm.get_computed_blocks(hit) == BS


def test_reset_prefix_cache_and_disabled_caching() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(2 * BS + 1))
    prefill(bm, make_seq(tokens))
    bm.reset_prefix_cache()
    assert bm.get_computed_blocks(make_seq(tokens)) == 0

    off = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    prefill(off, make_seq(tokens))
    assert off.get_computed_blocks(make_seq(tokens)) == 0
