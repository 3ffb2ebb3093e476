"""Probe (session 5): how fast is the split-KV decode attention kernel at the batch sizes a decode worker runs,
for each number of splits? One layer of the Llama-3.1-8B shape (8 KV heads x 128, GQA 4, bf16, 16-token
blocks, block ids shuffled as in a long-running cache). Prints time per call and the KV bandwidth reached.

    python docs/results/probe_decode_splits.py      # on a GPU host, from the repository root
"""

from __future__ import annotations

import random

import torch
import triton

from cluster.engine.kernels import attention as A
from cluster.engine.kernels.tiling import decode_splits

torch.manual_seed(0)
dev = torch.device("cuda")
SMS = torch.cuda.get_device_properties(dev).multi_processor_count
HQ, HKV, D, BS = 32, 8, 128, 16


def run(q, kc, vc, tables, ctx, splits, block_n):
    bsz = q.shape[0]
    o = torch.empty((bsz, HQ, splits, D), dtype=torch.float32, device=dev)
    lse = torch.empty((bsz, HQ, splits), dtype=torch.float32, device=dev)
    A._decode_partial_kernel[(bsz, HKV, splits)](
        q, kc, vc, tables, ctx, o, lse, D**-0.5, tables.stride(0), NUM_SPLITS=splits, NUM_KV=HKV, G=HQ // HKV,
        G_PAD=16, D=D, BS=BS, BLOCK_N=block_n, PRECISION="ieee", num_warps=4, num_stages=2)
    out = torch.empty_like(q)
    A._decode_merge_kernel[(bsz * HQ,)](o, lse, out, NUM_SPLITS=splits, S_PAD=max(2, triton.next_power_of_2(splits)),
                                        D=D, num_warps=4)
    return out


def case(name, lens):
    bsz = len(lens)
    nblk = sum(-(-n // BS) for n in lens) + 8
    kc = torch.randn((nblk, BS, HKV, D), dtype=torch.bfloat16, device=dev)
    vc = torch.randn_like(kc)
    ids = list(range(nblk))
    random.Random(1).shuffle(ids)
    width = max(-(-n // BS) for n in lens)
    rows, k = [], 0
    for n in lens:
        b = -(-n // BS)
        rows.append(ids[k:k + b] + [0] * (width - b))
        k += b
    tables = torch.tensor(rows, dtype=torch.int32, device=dev)
    ctx = torch.tensor(lens, dtype=torch.int32, device=dev)
    q = torch.randn((bsz, HQ, D), dtype=torch.bfloat16, device=dev)
    nbytes = sum(lens) * HKV * D * 2 * 2
    ref = run(q, kc, vc, tables, ctx, 1, 32).float()
    now = decode_splits(bsz, HKV, SMS)
    print(f"{name}: B={bsz}, contexts {min(lens)}..{max(lens)} (mean {sum(lens) / bsz:.0f}), "
          f"KV {nbytes / 2**20:.0f} MiB per layer; current choice: {now} splits")
    for block_n in (32, 64):
        for splits in (1, 2, 4, 8, 16, 32):
            out = run(q, kc, vc, tables, ctx, splits, block_n)
            err = (out.float() - ref).abs().max().item()
            for _ in range(3):
                run(q, kc, vc, tables, ctx, splits, block_n)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50):
                run(q, kc, vc, tables, ctx, splits, block_n)
            end.record()
            end.synchronize()
            us = start.elapsed_time(end) / 50 * 1e3
            print(f"  BLOCK_N {block_n:2d} splits {splits:2d} ({bsz * HKV * splits:5d} programs): {us:7.1f} us"
                  f"  {nbytes / us / 1e3:6.0f} GB/s  x32 layers {us * 32 / 1e3:5.2f} ms  (max err {err:.1e})")


rng = random.Random(0)
for bsz in (1, 8, 16, 64):
    case("uniform 2560" if bsz != 64 else "uniform 2048", [2560 if bsz != 64 else 2048] * bsz)
for bsz in (8, 16):
    case("mixed (workload a)", [rng.randint(1024, 4096) + rng.randint(0, 256) for _ in range(bsz)])
