"""KV cache blocks: a free queue in eviction order, reference counts and automatic prefix caching."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from worker.engine.sequence import Sequence


def hash_block(parent: bytes, token_ids: list[int], cache_salt: str) -> bytes:
    """Chained digest of one full block: equal digests mean equal prefixes, salt included."""
    h = hashlib.blake2b(parent, digest_size=16)
    salt = cache_salt.encode()
    # Length-prefix the salt so (salt, tokens) cannot be re-split into another pair with the same bytes.
    h.update(len(salt).to_bytes(4, "little"))
    h.update(salt)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set while the block is findable in the prefix cache


@dataclass
class _SeqHashes:
    hashes: list[bytes] = field(default_factory=list)  # digests of the seq's full blocks, computed once
    num_registered: int = 0  # leading blocks of block_table already in the cache (or deliberately not)
    pending_stats: tuple[int, int] | None = None  # (queried, hit) tokens, counted once admitted


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, front evicted first. Empty blocks sit at the front, cached ones are
        # appended at the back when freed, so the least recently freed cached block goes first (LRU).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}  # block hash -> block id
        self._seq_state: dict[str, _SeqHashes] = {}
        self.prefix_queries_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (free cached blocks count as free)."""
        return 1.0 - len(self._free) / len(self.blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------------

    def _hashes(self, seq: Sequence, num_full_blocks: int) -> list[bytes]:
        """The seq's block digests, extended to cover num_full_blocks (token_ids only ever grow)."""
        state = self._seq_state.setdefault(seq.request_id, _SeqHashes())
        hashes, bs = state.hashes, self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else b""
            hashes.append(hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs], seq.cache_salt))
        return hashes

    def get_computed_blocks(self, seq: Sequence) -> int:
        """Attach the longest cached prefix of seq to its block table; returns the cached token count."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        hit: list[int] = []
        if self.enable_prefix_caching and not seq.needs_prompt_logprobs:
            # At most (n - 1) // bs blocks: the last token must be computed so the model yields logits.
            max_blocks = (seq.num_tokens - 1) // self.block_size
            for h in self._hashes(seq, max_blocks)[:max_blocks]:
                block_id = self._cached.get(h)
                if block_id is None:
                    break
                hit.append(block_id)
        for block_id in hit:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        num_hit = len(hit) * self.block_size
        seq.block_table = hit
        seq.num_computed_tokens = num_hit
        # A preempted seq may hit on its own output; the reported figure stays the first admission's.
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = min(num_hit, seq.num_prompt_tokens)
        state = self._seq_state.setdefault(seq.request_id, _SeqHashes())
        state.num_registered = len(hit)
        # Counted on admission only, so a seq that waits for blocks over many steps counts once.
        state.pending_stats = (seq.num_tokens, num_hit)
        return num_hit

    def cache_full_blocks(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Make the blocks that num_computed_tokens filled findable by later sequences."""
        if not self.enable_prefix_caching:
            return
        state = self._seq_state.setdefault(seq.request_id, _SeqHashes())
        num_full = min(num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= state.num_registered:
            return
        hashes = self._hashes(seq, num_full)
        for i in range(state.num_registered, num_full):
            block = self.blocks[seq.block_table[i]]
            # If another seq already cached the same content, ours stays uncached: one copy is findable.
            if block.hash is None and hashes[i] not in self._cached:
                block.hash = hashes[i]
                self._cached[hashes[i]] = block.block_id
        state.num_registered = num_full

    def share_prompt(self, parent: Sequence, child: Sequence) -> int:
        """Attach the parent's full prompt blocks to a child of the same prompt (another choice), their
        reference counts raised: the child computes only the rest. The last prompt token stays to compute,
        so that the child gets logits of its own to sample from. Returns the shared token count."""
        assert not child.block_table and child.num_computed_tokens == 0
        num = min((child.num_prompt_tokens - 1) // self.block_size,
                  parent.num_computed_tokens // self.block_size, len(parent.block_table))
        shared = parent.block_table[:num]
        for block_id in shared:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(shared)
        child.num_computed_tokens = child.num_cached_tokens = num * self.block_size
        # Those blocks are registered already (or deliberately not): the child's own start after them.
        self._seq_state[child.request_id] = _SeqHashes(num_registered=num)
        return num * self.block_size

    def reset_prefix_cache(self) -> None:
        """Forget every cached digest (e.g. after new weights); blocks in use stay allocated."""
        for block in self.blocks:
            block.hash = None
        self._cached.clear()

    # -- allocation -------------------------------------------------------------------------------

    def _new_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        return max(0, self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._new_blocks_needed(seq, num_new_tokens) <= len(self._free)

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow seq.block_table to hold num_new_tokens more tokens; all or nothing."""
        needed = self._new_blocks_needed(seq, num_new_tokens)
        if needed > len(self._free):
            return False
        for _ in range(needed):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # reusing a cached block evicts its content
                if self._cached.get(block.hash) == block_id:
                    del self._cached[block.hash]
                block.hash = None
            block.ref_count = 1
            seq.block_table.append(block_id)
        state = self._seq_state.get(seq.request_id)
        if state is not None and state.pending_stats is not None:
            queried, hit = state.pending_stats
            self.prefix_queries_tokens += queried
            self.prefix_hit_tokens += hit
            state.pending_stats = None
        return True

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks, tail first, so a sequence's tail is evicted before its shared prefix."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash is None:  # nothing worth keeping: hand it out before any cached block
                    self._free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._seq_state.pop(seq.request_id, None)
