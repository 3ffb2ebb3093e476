"""Paged attention kernels reading K/V through block tables.

- `paged_decode_attention`: one query token per sequence, split-KV (flash-decoding): each of `num_splits`
  programs per (sequence, KV head) covers an equal share of the sequence's context, then a second kernel
  merges the partial results by their log-sum-exp. Shapes depend only on the batch size, so it can be
  captured in a CUDA graph; each sequence's length is read on the device.
- `paged_prefill_attention`: causal flash attention for the new tokens of each sequence against its whole
  context (cached prefix + new tokens), tiles of queries listed by the host.
All heads of a GQA group share one program in decode, so K/V are read once per group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cluster.engine.kernels.tiling import PREFILL_BLOCK_M


def _precision(q: torch.Tensor) -> str:
    """float32 stays exact IEEE (no TF32), so float32 runs can match a float32 reference token for token."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


# Metadata arguments vary step to step (views at any offset of one uploaded buffer, block-table widths):
# never specialise on them, or Triton recompiles the first time a new alignment class shows up mid-serving.
@triton.jit(do_not_specialize=["tables_ptr", "ctx_ptr", "table_stride"])
def _decode_partial_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, ctx_ptr, o_ptr, lse_ptr, scale, table_stride,
                           NUM_SPLITS: tl.constexpr, NUM_KV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                           D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    gmask = g < G
    q = tl.load(q_ptr + ((b * NUM_KV + h) * G + g[:, None]) * D + d[None, :], mask=gmask[:, None], other=0.0)
    m = tl.full((G_PAD,), float("-inf"), tl.float32)
    l_sum = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D), tl.float32)
    qk_scale = scale * 1.4426950408889634
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tmask = t < end
        blk = tl.load(tables_ptr + b * table_stride + t // BS, mask=tmask, other=0).to(tl.int64)
        row = (blk * BS + t % BS) * NUM_KV + h
        k = tl.load(k_ptr + row[:, None] * D + d[None, :], mask=tmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + row[:, None] * D + d[None, :], mask=tmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out_row = (b * NUM_KV + h) * G + g
    has = l_sum > 0
    lse = tl.where(has, m / 1.4426950408889634 + tl.log(tl.where(has, l_sum, 1.0)), float("-inf"))
    acc = acc / tl.where(has, l_sum, 1.0)[:, None]
    tl.store(o_ptr + (out_row[:, None] * NUM_SPLITS + split) * D + d[None, :], acc, mask=gmask[:, None])
    tl.store(lse_ptr + out_row * NUM_SPLITS + split, lse, mask=gmask)


@triton.jit
def _decode_merge_kernel(o_ptr, lse_ptr, out_ptr, NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr, D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (sequence, query head)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D)
    smask = s < NUM_SPLITS
    lse = tl.load(lse_ptr + row * NUM_SPLITS + s, mask=smask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.where(lse > float("-inf"), tl.exp(lse - m), 0.0)
    o = tl.load(o_ptr + (row * NUM_SPLITS + s[:, None]) * D + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           num_splits: int) -> torch.Tensor:
    """q [B, Hq, D]; caches [N, block_size, Hkv, D]; returns [B, Hq, D]."""
    bsz, num_q, dim = q.shape
    _, block_size, num_kv, _ = k_cache.shape
    group = num_q // num_kv
    o = torch.empty((bsz, num_q, num_splits, dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((bsz, num_q, num_splits), dtype=torch.float32, device=q.device)
    _decode_partial_kernel[(bsz, num_kv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, o, lse, scale, block_tables.stride(0),
        NUM_SPLITS=num_splits, NUM_KV=num_kv, G=group, G_PAD=max(16, triton.next_power_of_2(group)), D=dim,
        BS=block_size, BLOCK_N=max(32, block_size), PRECISION=_precision(q), num_warps=4, num_stages=2)
    out = torch.empty_like(q)
    _decode_merge_kernel[(bsz * num_q,)](o, lse, out, NUM_SPLITS=num_splits,
                                         S_PAD=max(2, triton.next_power_of_2(num_splits)), D=dim, num_warps=4)
    return out


@triton.jit(do_not_specialize=["tables_ptr", "tile_seq_ptr", "tile_start_ptr", "q_loc_ptr", "ctx_ptr",
                               "table_stride"])
def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, tables_ptr, tile_seq_ptr, tile_start_ptr, q_loc_ptr, ctx_ptr,
                    scale, table_stride, NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, D: tl.constexpr,
                    BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    hq = tl.program_id(1)
    h = hq // (NUM_Q // NUM_KV)
    seq = tl.load(tile_seq_ptr + tile).to(tl.int64)
    q_first = tl.load(tile_start_ptr + tile)  # index among the sequence's new tokens
    q_begin = tl.load(q_loc_ptr + seq)
    q_len = tl.load(q_loc_ptr + seq + 1) - q_begin
    ctx = tl.load(ctx_ptr + seq)
    i = q_first + tl.arange(0, BLOCK_M)
    qmask = i < q_len
    qpos = ctx - q_len + i  # absolute positions of these queries
    d = tl.arange(0, D)
    q = tl.load(q_ptr + ((q_begin + i[:, None]).to(tl.int64) * NUM_Q + hq) * D + d[None, :],
                mask=qmask[:, None], other=0.0)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    qk_scale = scale * 1.4426950408889634
    kv_end = tl.minimum(ctx, ctx - q_len + q_first + BLOCK_M)  # causal: nothing past the last query
    for t0 in range(0, kv_end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tmask = t < kv_end
        blk = tl.load(tables_ptr + seq * table_stride + t // BS, mask=tmask, other=0).to(tl.int64)
        row = (blk * BS + t % BS) * NUM_KV + h
        k = tl.load(k_ptr + row[:, None] * D + d[None, :], mask=tmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where((t[None, :] <= qpos[:, None]) & tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + row[:, None] * D + d[None, :], mask=tmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    acc = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    tl.store(o_ptr + ((q_begin + i[:, None]).to(tl.int64) * NUM_Q + hq) * D + d[None, :],
             acc.to(o_ptr.dtype.element_ty), mask=qmask[:, None])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor, context_lens: torch.Tensor,
                            tile_seq: torch.Tensor, tile_start: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, Hq, D] (new tokens of all sequences, flat); returns [T, Hq, D]."""
    _, num_q, dim = q.shape
    _, block_size, num_kv, _ = k_cache.shape
    out = torch.empty_like(q)
    block_n = 64 if dim <= 64 else 32
    _prefill_kernel[(tile_seq.shape[0], num_q)](
        q, k_cache, v_cache, out, block_tables, tile_seq, tile_start, query_start_loc, context_lens, scale,
        block_tables.stride(0), NUM_Q=num_q, NUM_KV=num_kv, D=dim, BS=block_size, BLOCK_M=PREFILL_BLOCK_M,
        BLOCK_N=block_n, PRECISION=_precision(q), num_warps=4, num_stages=2)
    return out
