"""How the attention kernels split their work (pure Python, importable without Triton)."""

from __future__ import annotations

DECODE_PROGRAMS_PER_SM = 8


def decode_splits(batch: int, num_kv_heads: int, num_sms: int, max_splits: int = 32) -> int:
    """Splits of each sequence's KV so that batch * heads * splits is about 8 programs per SM.

    Measured on an H200, 8B shape (`docs/results/probe_decode_splits.txt`): 2 per SM (the old choice) left the
    kernel latency-bound, at 1.7-2.3 TB/s for batch 8-16; 8 per SM reaches 2.4-3.4 TB/s, and with mixed
    context lengths (1.3K-4.2K) at batch 16 it cuts attention from 3.58 to 1.92 ms per step (32 layers):
    many programs per SM balance uneven sequences. Batch 64 gets 2 splits (4.64 -> 4.28 ms)."""
    return max(1, min(max_splits, (DECODE_PROGRAMS_PER_SM * num_sms) // max(1, batch * num_kv_heads)))


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
