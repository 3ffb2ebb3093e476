"""Paged KV block accounting: free list, reference counts, prefix caching by chained block hashes.

Block 0 is a scratch block that padding tokens write into; it is never handed out. A block whose
reference count drops to 0 goes to the back of the free list but keeps its hash, so a later request
with the same prefix can take it back (a prefix-cache hit); allocation takes from the front, evicting
the least recently freed cached block first.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Literal

from cluster.engine.sequence import Sequence
from cluster.prefix_hash import chain_block_hashes, hash_block

Growth = Literal["lru", "lowest_id"]


class BlockManager:
    """Owns block ids 1..num_blocks-1 of one KV cache.

    `growth` is where a growing sequence's next block comes from: "lru", the free list's front (the least
    recently freed block: prefix-cache eviction goes oldest first); "lowest_id", the lowest free id, which fills
    holes and leaves the long free runs whole for the next fresh allocation (it ignores eviction order, so only
    without a prefix cache).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 growth: Growth = "lru") -> None:
        if num_blocks < 2:
            raise ValueError(f"need at least 2 KV blocks (one is scratch), got {num_blocks}")
        if growth not in ("lru", "lowest_id"):
            raise ValueError(f"growth must be 'lru' or 'lowest_id', got {growth!r}")
        if growth == "lowest_id" and enable_prefix_caching:
            raise ValueError("growth 'lowest_id' ignores the prefix cache's eviction order: turn the cache off")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[str | None] = [None] * num_blocks
        self.hash_to_block: dict[str, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        # "lowest_id": a heap of the free ids with lazy deletion (entries of blocks taken from the free list's
        # front are skipped when popped).
        self._lowest: list[int] | None = list(range(1, num_blocks)) if growth == "lowest_id" else None

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # ---- allocation ------------------------------------------------------------------------------
    def _take_free_block(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.block_hash[block]
        if old is not None:  # evict its cached content
            if self.hash_to_block.get(old) == block:
                del self.hash_to_block[old]
            self.block_hash[block] = None
        self.ref_count[block] = 1
        return block

    def _acquire(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding a leading run of the sequence's full blocks (never all of its tokens)."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (len(seq) - 1) // self.block_size  # keep >= 1 token to compute
        hits: list[int] = []
        for h in chain_block_hashes(seq.token_ids[: max_blocks * self.block_size], self.block_size):
            block = self.hash_to_block.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cached_prefix(seq)
        reusable_free = sum(1 for b in hits if self.ref_count[b] == 0)
        needed = self.blocks_needed(len(seq)) - len(hits)
        return needed <= self.num_free_blocks - reusable_free

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.request_id} already holds blocks")
        if not self.can_allocate(seq):
            raise RuntimeError(f"not enough free KV blocks for {seq.request_id}")
        hits = self._cached_prefix(seq)
        for block in hits:
            self._acquire(block)
        seq.block_table = hits + self._take_fresh(self.blocks_needed(len(seq)) - len(hits))
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)

    def allocate_blocks(self, num_tokens: int) -> list[int]:
        """Fresh blocks for KV that will be written from outside (a reservation)."""
        n = self.blocks_needed(num_tokens)
        if n > self.num_free_blocks:
            raise RuntimeError(f"not enough free KV blocks: need {n}, have {self.num_free_blocks}")
        return self._take_fresh(n)

    def _take_fresh(self, n: int) -> list[int]:
        """`n` blocks off the free list, in ascending id order. Which blocks (and so which cached ones are
        evicted) is the free list's choice; the order only decides where each token goes. Ascending keeps the
        runs that blocks freed together came back as (they return tail first), so a handoff moves fewer
        pieces (`pdserve bench blocks`; cuda_ipc copies each run of consecutive ids as one copy)."""
        return sorted(self._take_free_block() for _ in range(n))

    def release_blocks(self, blocks: list[int]) -> None:
        """Drop one reference to each block; the last reference returns it to the free list."""
        for block in reversed(blocks):
            if self.ref_count[block] <= 0:
                raise RuntimeError(f"block {block} freed more often than taken")
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
                if self._lowest is not None:
                    heapq.heappush(self._lowest, block)

    def free_sequence(self, seq: Sequence) -> None:
        self.release_blocks(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0

    # ---- decode growth ---------------------------------------------------------------------------
    def can_append(self, seq: Sequence) -> bool:
        """True if the sequence's tokens fit its blocks, or one more free block makes them fit."""
        return self.blocks_needed(len(seq)) <= len(seq.block_table) or self.num_free_blocks > 0

    def append_slot(self, seq: Sequence) -> None:
        while self.blocks_needed(len(seq)) > len(seq.block_table):
            seq.block_table.append(self.grow_block())

    def grow_block(self) -> int:
        """One more block for a growing sequence, by the `growth` policy. With "lowest_id" every free block has
        an entry in the heap."""
        if not self.free:
            raise RuntimeError("no free KV block to grow into (check can_append first)")
        heap = self._lowest
        if heap is None:
            return self._take_free_block()
        if len(heap) > 2 * self.num_blocks:  # mostly stale entries: start over from the free list
            heap[:] = list(self.free)
            heapq.heapify(heap)
        while True:
            block = heapq.heappop(heap)
            if self.ref_count[block] == 0:
                del self.free[block]
                self.ref_count[block] = 1
                return block

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of blocks whose every token now has KV in the cache."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_hashed_blocks:
            return
        bs = self.block_size
        for i in range(seq.num_hashed_blocks, full):
            # Blocks a sequence holds keep their hash, so the chain continues from the previous block's.
            prev = self.block_hash[seq.block_table[i - 1]] if i else None
            h = hash_block(prev, seq.token_ids[i * bs:(i + 1) * bs])
            block = seq.block_table[i]
            self.block_hash[block] = h
            self.hash_to_block.setdefault(h, block)
        seq.num_hashed_blocks = full

    # ---- accounting ------------------------------------------------------------------------------
    def check_invariants(self, live_tables: list[list[int]]) -> None:
        """Raise if reference counts disagree with the block tables of live sequences/reservations."""
        counts = [0] * self.num_blocks
        for table in live_tables:
            for b in table:
                counts[b] += 1
        if counts != self.ref_count:
            bad = [i for i in range(self.num_blocks) if counts[i] != self.ref_count[i]][:5]
            raise AssertionError(f"block reference counts disagree with live tables at blocks {bad}")
        free = {i for i in range(1, self.num_blocks) if self.ref_count[i] == 0}
        if free != set(self.free):
            raise AssertionError("free list does not match blocks with no references")
