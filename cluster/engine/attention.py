"""Paged attention over the engine's KV cache, and the forward context that carries its metadata.

The model calls `attention_from_qkv(...)`; the runner sets the metadata for the whole forward with
`forward_context(...)`. On CUDA the Triton kernels in `kernels/` run; the torch implementation here is the
reference and the CPU path. Decode shapes are static for a given batch size, so it can be captured in a
CUDA graph (sequence lengths and block tables are read from device tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cluster.engine.models.rope import RotaryEmbedding


@dataclass
class AttentionMetadata:
    """Where each new token's K/V goes and what each sequence attends to.

    slot_mapping: [T] flat cache slot (block_id * block_size + offset) per new token (-1: do not store).
    block_tables: [B, W] block ids per sequence, padded with 0.
    context_lens: [B] tokens each sequence attends to after this step (cached + new).
    Prefill only: query_start_loc [B+1] offsets of each sequence's new tokens in the flat batch,
    and the same as host lists (`query_lens`, `context_lens_host`) for the per-sequence loop.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor | None = None
    query_lens: list[int] | None = None
    context_lens_host: list[int] | None = None
    # CUDA kernels only: query tiles of a prefill batch, and the split-KV factor of a decode batch
    tile_seq: torch.Tensor | None = None
    tile_start: torch.Tensor | None = None
    num_splits: int = 1


@dataclass
class ForwardContext:
    metadata: AttentionMetadata
    kv_cache: torch.Tensor  # [L, 2, num_blocks, block_size, Hkv, D]
    on_layer_kv: Callable[[int], None] | None = None  # called once layer i's KV writes are enqueued


_CONTEXT: ForwardContext | None = None


@contextmanager
def forward_context(metadata: AttentionMetadata, kv_cache: torch.Tensor,
                    on_layer_kv: Callable[[int], None] | None = None) -> Iterator[None]:
    """Make `metadata` and `kv_cache` visible to every attention layer during one forward; `on_layer_kv(i)`
    runs right after layer i enqueued its KV-cache writes (a prefill streams its KV out from there)."""
    global _CONTEXT
    prev, _CONTEXT = _CONTEXT, ForwardContext(metadata, kv_cache, on_layer_kv)
    try:
        yield
    finally:
        _CONTEXT = prev


def attention_from_qkv(qkv: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, layer: int,
                       num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> torch.Tensor:
    """The attention block after the fused q/k/v projection: RoPE, KV store, paged attention -> [T, Hq*D].

    On CUDA this runs the Triton kernels (RoPE fused with the store); elsewhere the torch reference.
    """
    ctx = _CONTEXT
    if ctx is None:
        raise RuntimeError("attention called outside forward_context")
    meta = ctx.metadata
    k_cache, v_cache = ctx.kv_cache[layer, 0], ctx.kv_cache[layer, 1]  # [N, bs, Hkv, D]
    if qkv.is_cuda:
        out = _cuda_attention(qkv, positions, rotary, meta, k_cache, v_cache, num_heads, num_kv_heads, head_dim,
                              scale).view(qkv.shape[0], -1)
    else:
        q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        q = q.view(-1, num_heads, head_dim)
        k = k.view(-1, num_kv_heads, head_dim)
        v = v.view(-1, num_kv_heads, head_dim)
        q, k = rotary(positions, q, k)
        out = attention(q, k, v, k_cache, v_cache, meta, scale).reshape(qkv.shape[0], -1)
    if ctx.on_layer_kv is not None:
        ctx.on_layer_kv(layer)
    return out


def _cuda_attention(qkv: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, meta: AttentionMetadata,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int,
                    head_dim: int, scale: float) -> torch.Tensor:
    from cluster.engine.kernels.attention import paged_decode_attention, paged_prefill_attention
    from cluster.engine.kernels.elementwise import rope_and_store

    q = rope_and_store(qkv, positions, rotary.cos, rotary.sin, meta.slot_mapping, k_cache, v_cache, num_heads,
                       num_kv_heads, head_dim)
    if meta.is_prefill:
        assert meta.query_start_loc is not None and meta.tile_seq is not None and meta.tile_start is not None
        return paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
                                       meta.context_lens, meta.tile_seq, meta.tile_start, scale)
    return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                                  meta.num_splits)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Reference path. q: [T, Hq, D]; k, v: [T, Hkv, D] (new tokens, RoPE applied). Returns [T, Hq, D]."""
    store_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    if meta.is_prefill:
        return _prefill_attention(q, k_cache, v_cache, meta, scale)
    return _decode_attention(q, k_cache, v_cache, meta, scale)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new tokens' K/V into their cache slots (slots < 0 are padding and are skipped)."""
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    # Padding slots point at a scratch slot: block 0 is never handed to a sequence (see BlockManager).
    slots = slot_mapping.clamp(min=0)
    flat_k.index_copy_(0, slots, k.to(flat_k.dtype))
    flat_v.index_copy_(0, slots, v.to(flat_v.dtype))


def _gather_context(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    return cache[blocks].flatten(0, 1)[:length]


def _prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       meta: AttentionMetadata, scale: float) -> torch.Tensor:
    assert meta.query_lens is not None and meta.context_lens_host is not None
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    start = 0
    for i, (q_len, ctx_len) in enumerate(zip(meta.query_lens, meta.context_lens_host, strict=True)):
        n_blocks = (ctx_len + block_size - 1) // block_size
        blocks = meta.block_tables[i, :n_blocks]
        keys = _gather_context(k_cache, blocks, ctx_len).transpose(0, 1)  # [Hkv, ctx, D]
        values = _gather_context(v_cache, blocks, ctx_len).transpose(0, 1)
        queries = q[start:start + q_len].transpose(0, 1)  # [Hq, q_len, D]
        if q_len == ctx_len:
            o = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale,
                                               enable_gqa=True)
        else:  # cached prefix: query j sits at absolute position ctx_len - q_len + j
            pos_q = torch.arange(ctx_len - q_len, ctx_len, device=q.device)[:, None]
            mask = torch.arange(ctx_len, device=q.device)[None, :] <= pos_q
            o = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale,
                                               enable_gqa=True)
        out[start:start + q_len] = o.transpose(0, 1)
        start += q_len
    return out


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query token per sequence; static shapes ([B, W * block_size] keys, masked by length)."""
    bsz = q.shape[0]
    keys = k_cache[meta.block_tables].flatten(1, 2).transpose(1, 2)  # [B, Hkv, W*bs, D]
    values = v_cache[meta.block_tables].flatten(1, 2).transpose(1, 2)
    positions = torch.arange(keys.shape[2], device=q.device)[None, :]
    mask = (positions < meta.context_lens[:, None])[:, None, None, :]  # [B, 1, 1, W*bs]
    o = F.scaled_dot_product_attention(q.view(bsz, -1, 1, q.shape[-1]), keys, values, attn_mask=mask,
                                       scale=scale, enable_gqa=True)
    return o.view(bsz, -1, q.shape[-1])
