"""How "cuda_ipc" copies a handoff's blocks into the receiver's cache (mapped into the sender, `ipc_memory`),
block to block with no staging buffer, over NVLink / PCIe peer access (or within one GPU).

Where the source and destination ids form few runs of consecutive blocks (what a cache under churn mostly
gives, `pdserve bench blocks`), each run is ONE 2D copy on the copy engine (cudaMemcpy2DAsync: a row per layer
and key/value), which takes no SMs from a prefill it runs beside; scattered ids take the Triton
block-to-block kernel (`block_copy`).
"""

from __future__ import annotations

from typing import Any

import torch

from cluster.transport.cuda_streams import device_ids

# Past this many runs, the copy engine's per-copy cost outweighs what it saves against the kernel
# (docs/benchmarks.md, "cuda_ipc").
COPY_ENGINE_MAX_RUNS = 32
STREAMING_PROGRAMS = 16  # the kernel's thread blocks beside a prefill: few SMs for longer, not all at once
_MEMCPY_DEVICE_TO_DEVICE = 3  # cudaMemcpyDeviceToDevice


def block_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(first source block, first destination block, length) of each maximal run where both id lists
    advance by one together: `src[i:i+n] == range(s, s+n)` and `dst[i:i+n] == range(d, d+n)`."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(src) + 1):
        if i == len(src) or src[i] != src[i - 1] + 1 or dst[i] != dst[i - 1] + 1:
            runs.append((src[start], dst[start], i - start))
            start = i
    return runs


class BlockCopy:
    """One handoff's copy from `cache` into `peer`, layers at a time, enqueued on `stream`. Picked at
    construction: few runs -> copy engine; else the kernel, the ids sent to the GPU now."""

    def __init__(self, cache: torch.Tensor, peer: torch.Tensor, src: list[int], dst: list[int],
                 stream: torch.cuda.Stream, device_index: int, cupy: Any) -> None:
        self.cache, self.peer, self.stream, self.device_index, self.cupy = cache, peer, stream, device_index, cupy
        self.runs = block_runs(src, dst)
        self.idx: tuple[torch.Tensor, torch.Tensor] | None = None
        if len(self.runs) > COPY_ENGINE_MAX_RUNS:
            with torch.cuda.stream(stream):
                self.idx = device_ids(src, cache.device), device_ids(dst, cache.device)

    def layers(self, lo: int, hi: int, streaming: bool) -> None:
        """Enqueue layers [lo, hi), behind the work on the current stream (the model's writes of them)."""
        self.stream.wait_stream(torch.cuda.current_stream(self.cache.device))
        if self.idx is None:
            self._copy_runs(lo, hi)
            return
        from cluster.transport.block_copy import copy_blocks

        with torch.cuda.stream(self.stream):
            copy_blocks(self.cache, self.peer, *self.idx, lo, hi,
                        max_programs=STREAMING_PROGRAMS if streaming else None)

    def _copy_runs(self, lo: int, hi: int) -> None:
        """Layers [lo, hi) of each run as one 2D copy-engine copy: rows are (layer, key/value) planes (evenly
        spaced: both caches are contiguous)."""
        cache, peer = self.cache, self.peer
        size = cache.element_size()
        block, src_pitch, dst_pitch = cache.stride(2) * size, cache.stride(1) * size, peer.stride(1) * size
        src0, dst0 = cache.data_ptr() + 2 * lo * src_pitch, peer.data_ptr() + 2 * lo * dst_pitch
        memcpy2d = self.cupy.cuda.runtime.memcpy2DAsync
        with self.cupy.cuda.Device(self.device_index):
            for s, d, n in self.runs:
                memcpy2d(dst0 + d * block, dst_pitch, src0 + s * block, src_pitch, n * block, 2 * (hi - lo),
                         _MEMCPY_DEVICE_TO_DEVICE, self.stream.cuda_stream)
