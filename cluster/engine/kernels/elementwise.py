"""Fused row kernels: residual add + RMSNorm, SiLU(gate) * up, and RoPE + KV-cache store.

Each reproduces the rounding of the torch reference (and of transformers) in the tensor's dtype:
RMSNorm in float32, cast to the dtype, then times the weight; RoPE products rounded to the dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    if HAS_RES:
        x = x + tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * n_cols + cols, (w * normed).to(x.dtype), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual); with residual None: (norm(x), x)."""
    rows, cols = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    _add_rms_norm_kernel[(rows,)](x, residual if residual is not None else x, weight, out, res_out, cols, eps,
                                  HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(cols),
                                  num_warps=4 if cols <= 2048 else 8)
    return out, res_out


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * n_cols + cols, (act * up).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim -> silu(gate) * up."""
    rows, cols2 = x.shape
    cols = cols2 // 2
    out = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(cols, block))](x, out, cols, BLOCK=block, num_warps=4)
    return out


@triton.jit(do_not_specialize=["pos_ptr", "slot_ptr"])  # views at any offset of the step's upload
def _rope_store_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                       qkv_stride, NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, D: tl.constexpr,
                       HEADS_PAD: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    slot = tl.where(slot < 0, 0, slot)  # padding tokens write into the scratch block
    half: tl.constexpr = D // 2
    i = tl.arange(0, half)
    heads = tl.arange(0, HEADS_PAD)
    base = qkv_ptr + tok * qkv_stride
    cos = tl.load(cos_ptr + pos * D + i)  # the first half equals the second (cat(freqs, freqs))
    sin = tl.load(sin_ptr + pos * D + i)
    is_q = heads < NUM_Q
    is_head = heads < NUM_Q + NUM_KV
    x1 = tl.load(base + heads[:, None] * D + i[None, :], mask=is_head[:, None], other=0.0)
    x2 = tl.load(base + heads[:, None] * D + half + i[None, :], mask=is_head[:, None], other=0.0)
    dt = x1.dtype
    c = cos.to(dt).to(tl.float32)[None, :]
    s = sin.to(dt).to(tl.float32)[None, :]
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    # x*cos + rotate_half(x)*sin with each product rounded to the dtype, as torch does in bf16/fp16
    o1 = ((f1 * c).to(dt).to(tl.float32) + (-f2 * s).to(dt).to(tl.float32)).to(dt)
    o2 = ((f2 * c).to(dt).to(tl.float32) + (f1 * s).to(dt).to(tl.float32)).to(dt)
    q_dst = q_out_ptr + tok * NUM_Q * D + heads[:, None] * D
    tl.store(q_dst + i[None, :], o1, mask=is_q[:, None])
    tl.store(q_dst + half + i[None, :], o2, mask=is_q[:, None])
    is_k = is_head & (heads >= NUM_Q)
    kh = tl.where(is_k, heads - NUM_Q, 0)
    k_dst = k_cache_ptr + (slot * NUM_KV + kh[:, None]) * D
    tl.store(k_dst + i[None, :], o1, mask=is_k[:, None])
    tl.store(k_dst + half + i[None, :], o2, mask=is_k[:, None])
    vh = heads
    is_v = vh < NUM_KV
    d = tl.arange(0, D)
    v = tl.load(base + (NUM_Q + NUM_KV) * D + vh[:, None] * D + d[None, :], mask=is_v[:, None], other=0.0)
    tl.store(v_cache_ptr + (slot * NUM_KV + vh[:, None]) * D + d[None, :], v, mask=is_v[:, None])


def rope_and_store(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   num_q: int, num_kv: int, head_dim: int) -> torch.Tensor:
    """Rotate q and k of the fused projection output, write k/v into their cache slots, return q [T, Hq, D]."""
    tokens = qkv.shape[0]
    q = torch.empty((tokens, num_q, head_dim), dtype=qkv.dtype, device=qkv.device)
    _rope_store_kernel[(tokens,)](qkv, positions, cos, sin, slot_mapping, q, k_cache, v_cache, qkv.stride(0),
                                  NUM_Q=num_q, NUM_KV=num_kv, D=head_dim,
                                  HEADS_PAD=triton.next_power_of_2(num_q + num_kv), num_warps=4)
    return q
