"""Triton kernels against the torch reference path: on a GPU, or on the CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from cluster.engine import attention as ref  # noqa: E402
from cluster.engine.kernels import attention as kattn  # noqa: E402
from cluster.engine.kernels import elementwise as kel  # noqa: E402
from cluster.engine.kernels.tiling import prefill_tiles  # noqa: E402
from cluster.engine.model_spec import RopeSpec  # noqa: E402
from cluster.engine.models.rope import RotaryEmbedding  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter mishandles bfloat16 (numpy has none), so bf16 runs only on a GPU.
DTYPES = [torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(dtype):
    x = torch.randn(5, 96, dtype=dtype, device=DEVICE)
    r = torch.randn(5, 96, dtype=dtype, device=DEVICE)
    w = torch.randn(96, dtype=dtype, device=DEVICE)
    out, res = kel.add_rms_norm(x, r, w, 1e-5)
    h = x + r
    hf = h.float()
    expect = w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    assert torch.equal(res, h)
    assert rel_err(out, expect) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    x = torch.randn(3, 2 * 80, dtype=dtype, device=DEVICE)
    gate, up = x.split(80, dim=-1)
    assert rel_err(kel.silu_and_mul(x), torch.nn.functional.silu(gate) * up) < (1e-6 if dtype == torch.float32
                                                                                 else 1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_and_store(dtype):
    hq, hkv, d, bs = 4, 2, 32, 8
    rotary = RotaryEmbedding(RopeSpec(theta=10000.0), d, 64)
    rotary.build(DEVICE)
    tokens = 6
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, dtype=dtype, device=DEVICE)
    pos = torch.tensor([0, 5, 9, 17, 30, 63], device=DEVICE)
    slots = torch.tensor([8, 9, 20, -1, 31, 12], device=DEVICE)
    kc = torch.zeros(5, bs, hkv, d, dtype=dtype, device=DEVICE)
    vc = torch.zeros_like(kc)
    q = kel.rope_and_store(qkv, pos, rotary.cos, rotary.sin, slots, kc, vc, hq, hkv, d)
    q_ref, k_ref, v_ref = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q_ref, k_ref = rotary(pos, q_ref.reshape(tokens, hq, d), k_ref.reshape(tokens, hkv, d))
    assert rel_err(q, q_ref) < (1e-6 if dtype == torch.float32 else 1e-2)
    flat_k, flat_v = kc.view(-1, hkv, d), vc.view(-1, hkv, d)
    for t, s in enumerate(slots.tolist()):
        s = max(s, 0)
        if slots[t] >= 0:
            assert rel_err(flat_k[s], k_ref[t]) < (1e-6 if dtype == torch.float32 else 1e-2)
            assert torch.equal(flat_v[s], v_ref.reshape(tokens, hkv, d)[t])


def _paged_case(dtype, ctx_lens, hq=8, hkv=2, d=32, bs=16, num_blocks=64):
    torch.manual_seed(0)
    kc = torch.randn(num_blocks, bs, hkv, d, dtype=dtype, device=DEVICE)
    vc = torch.randn(num_blocks, bs, hkv, d, dtype=dtype, device=DEVICE)
    perm = torch.randperm(num_blocks - 1, device=DEVICE) + 1
    width = max((c + bs - 1) // bs for c in ctx_lens)
    tables = torch.zeros(len(ctx_lens), width + 3, dtype=torch.int32, device=DEVICE)
    used = 0
    for i, c in enumerate(ctx_lens):
        n = (c + bs - 1) // bs
        tables[i, :n] = perm[used:used + n]
        used += n
    return kc, vc, tables


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 3])
def test_paged_decode_attention(dtype, splits):
    ctx = [1, 17, 100, 47]
    kc, vc, tables = _paged_case(dtype, ctx)
    q = torch.randn(len(ctx), 8, 32, dtype=dtype, device=DEVICE)
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
    out = kattn.paged_decode_attention(q, kc, vc, tables, ctx_t, 0.2, splits)
    meta = ref.AttentionMetadata(is_prefill=False, slot_mapping=torch.empty(0), block_tables=tables.long(),
                                 context_lens=ctx_t)
    expect = ref._decode_attention(q.float(), kc.float(), vc.float(), meta, 0.2)
    assert rel_err(out, expect) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_prefill_attention(dtype):
    ctx = [70, 16, 130]
    qlens = [70, 5, 66]  # the last two have cached prefixes
    kc, vc, tables = _paged_case(dtype, ctx)
    total = sum(qlens)
    q = torch.randn(total, 8, 32, dtype=dtype, device=DEVICE)
    loc = torch.tensor([0, 70, 75, 141], dtype=torch.int32, device=DEVICE)
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
    seqs, starts = prefill_tiles(qlens)
    out = kattn.paged_prefill_attention(q, kc, vc, tables, loc, ctx_t,
                                        torch.tensor(seqs, dtype=torch.int32, device=DEVICE),
                                        torch.tensor(starts, dtype=torch.int32, device=DEVICE), 0.2)
    meta = ref.AttentionMetadata(is_prefill=True, slot_mapping=torch.empty(0), block_tables=tables.long(),
                                 context_lens=ctx_t, query_start_loc=loc, query_lens=qlens, context_lens_host=ctx)
    expect = ref._prefill_attention(q.float(), kc.float(), vc.float(), meta, 0.2)
    assert rel_err(out, expect) < (1e-5 if dtype == torch.float32 else 2e-2)
