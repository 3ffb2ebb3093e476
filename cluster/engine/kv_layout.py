"""The one definition of the paged KV cache layout, shared by the engine and every KV transport.

The cache of one engine is a single tensor of shape
    [num_layers, 2 (key, value), num_blocks, block_size, num_kv_heads, head_dim]
A request's KV is the set of its block ids; moving it between engines means gathering
`cache[:, :, block_ids]` (optionally a range of layers at a time, as a prefill produces them) and
scattering into the receiver's ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """Shape of the paged KV cache; both ends of a handoff must agree on it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")

    def cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (self.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elem

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def allocate(self, num_blocks: int, device: torch.device | str) -> torch.Tensor:
        return torch.zeros(self.cache_shape(num_blocks), dtype=self.dtype, device=device)

    def bytes_per_layer(self, num_blocks: int) -> int:
        """Bytes of one layer's key and value for `num_blocks` blocks."""
        return self.bytes_per_block // self.num_layers * num_blocks

    def gather(self, cache: torch.Tensor, block_ids: list[int] | torch.Tensor,
               layers: tuple[int, int] | None = None) -> torch.Tensor:
        """Copy the given blocks into one contiguous tensor [L, 2, n, ...] (layers lo..hi only if given)."""
        idx = torch.as_tensor(block_ids, dtype=torch.long, device=cache.device)
        src = cache if layers is None else cache[layers[0]:layers[1]]
        return src.index_select(2, idx).contiguous()

    def scatter(self, cache: torch.Tensor, block_ids: list[int] | torch.Tensor, data: torch.Tensor,
                layers: tuple[int, int] | None = None) -> None:
        """Write a tensor produced by `gather` (with the same `layers`) into the given blocks of `cache`."""
        idx = torch.as_tensor(block_ids, dtype=torch.long, device=cache.device)
        dst = cache if layers is None else cache[layers[0]:layers[1]]
        expected = dst.shape[:2] + (len(idx),) + dst.shape[3:]
        if tuple(data.shape) != tuple(expected):
            raise ValueError(f"KV data has shape {tuple(data.shape)}, expected {tuple(expected)}")
        dst.index_copy_(2, idx, data.to(device=cache.device, dtype=cache.dtype))
