"""Chained hashes of full KV blocks: the one definition shared by the engine's prefix cache and the
router's prefix-aware placement (torch-free).

Hash i covers blocks 0..i: blake2b-128 over (hash i-1 as raw bytes) + (the block's token ids as int32
little-endian). Equal hashes therefore mean equal prefixes, not just equal blocks. A trailing partial
block has no hash (it cannot be shared).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

DIGEST_SIZE = 16  # bytes; 128 bits make collisions negligible at any realistic cache size


def hash_block(prev_hash: str | None, block: Sequence[int]) -> str:
    """Hash of one block chained onto the hash of the blocks before it (None for the first block)."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    if prev_hash is not None:
        h.update(bytes.fromhex(prev_hash))
    h.update(struct.pack(f"<{len(block)}i", *block))
    return h.hexdigest()


def chain_block_hashes(token_ids: Sequence[int], block_size: int) -> list[str]:
    """Hex hashes of each FULL block of `token_ids`, each chained with the previous block's hash."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    out: list[str] = []
    prev: str | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        prev = hash_block(prev, token_ids[start:start + block_size])
        out.append(prev)
    return out
