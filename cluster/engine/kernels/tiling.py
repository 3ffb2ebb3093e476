"""How the attention kernels split their work (pure Python, importable without Triton)."""

from __future__ import annotations


def decode_splits(batch: int, num_kv_heads: int, num_sms: int, max_splits: int = 32) -> int:
    """Enough programs to fill the GPU about twice, for batch*heads programs per split."""
    return max(1, min(max_splits, (2 * num_sms) // max(1, batch * num_kv_heads)))


PREFILL_BLOCK_M = 64


def prefill_tiles(query_lens: list[int], block_m: int = PREFILL_BLOCK_M) -> tuple[list[int], list[int]]:
    """(sequence index, first query index) of every query tile, computed on the host."""
    seqs: list[int] = []
    starts: list[int] = []
    for s, n in enumerate(query_lens):
        for start in range(0, n, block_m):
            seqs.append(s)
            starts.append(start)
    return seqs, starts
