"""Block-to-block copy between two paged KV caches, with no staging buffer.

`copy_blocks(src_cache, dst_cache, src_ids, dst_ids, lo, hi)` writes `dst_cache[l, kv, dst_ids[i]] =
src_cache[l, kv, src_ids[i]]` for layers lo..hi in ONE kernel. The caches may hold different numbers of
blocks, and `dst_cache` may live on another GPU mapped into this process (CUDA IPC, peer access): then
the stores travel over NVLink straight into the peer's blocks. The cuda_ipc transport's copy for scattered ids
(`ipc_copy`); CUDA only (Triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 4096  # elements per load/store step: 8 KiB of bf16
_AS_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit(do_not_specialize=["n_blocks"])
def _copy_blocks_kernel(src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, src_lk_stride, dst_lk_stride, n_blocks,
                        BLOCK_NUMEL: tl.constexpr, TILE: tl.constexpr):
    lk = tl.program_id(1).to(tl.int64)  # (layer - lo) * 2 + key/value
    for i in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        s = tl.load(src_ids_ptr + i).to(tl.int64)
        d = tl.load(dst_ids_ptr + i).to(tl.int64)
        src = src_ptr + lk * src_lk_stride + s * BLOCK_NUMEL
        dst = dst_ptr + lk * dst_lk_stride + d * BLOCK_NUMEL
        for off in tl.range(0, BLOCK_NUMEL, TILE):
            o = off + tl.arange(0, TILE)
            mask = o < BLOCK_NUMEL
            tl.store(dst + o, tl.load(src + o, mask=mask), mask=mask)


def copy_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor,
                lo: int, hi: int, max_programs: int | None = None) -> None:
    """Enqueue the copy of layers [lo, hi) of blocks `src_ids` into blocks `dst_ids` on the current stream.

    Both caches are [L, 2, N, block_size, heads, head_dim] of one dtype (N may differ); ids are int64 on
    the current device. `max_programs` caps the thread blocks (each loops over several blocks): a copy
    that runs beside a prefill then takes a few SMs for longer instead of all of them for a moment.
    """
    if hi <= lo or src_ids.numel() == 0:
        return
    as_int = _AS_INT[src_cache.element_size()]
    src, dst = src_cache.view(as_int), dst_cache.view(as_int)
    block_numel = src[0, 0, 0].numel()
    lk = 2 * (hi - lo)
    n = src_ids.numel()
    programs = n if max_programs is None else max(1, min(n, max_programs // lk))
    _copy_blocks_kernel[(programs, lk)](
        src[lo], dst[lo], src_ids, dst_ids, src.stride(1), dst.stride(1), n,
        BLOCK_NUMEL=block_numel, TILE=min(_TILE, triton.next_power_of_2(block_numel)), num_warps=4)
