"""Probe (session 6): can a 2K-token KV handoff (Llama-3.1-8B shape, 256 MiB) cross NVLink faster than one
copy engine moves it? GPU 0 writes into GPU 1's cache by peer access, as cuda_ipc does, for the block ids of
one contiguous run and of the churned caches `bench kv --churned-ids` uses. Variants: the transport's copy
today (each run one 2D copy, one stream), the rows of every run split over K streams (K copy engines), the
runs dealt to K streams by size, a flat 1-D copy of the same bytes, and the Triton kernel on every SM.
Prints GPU time (events around the copies) and host enqueue time per variant, median of 30.

    python docs/results/probe_ce_split.py      # on a host with 2 NVLink-linked GPUs, from the repository root
"""

from __future__ import annotations

import statistics
import time

import cupy
import torch

from cluster.bench.blocks_bench import churned_ids
from cluster.transport.block_copy import copy_blocks
from cluster.transport.ipc_copy import block_runs

L, BS, HKV, D, NB = 32, 16, 8, 128, 4096
src_dev, dst_dev = torch.device("cuda:0"), torch.device("cuda:1")
torch.cuda.set_device(src_dev)
for a, b in ((0, 1), (1, 0)):
    with cupy.cuda.Device(a):
        cupy.cuda.runtime.deviceEnablePeerAccess(b)
src = torch.randn((L, 2, NB, BS, HKV, D), dtype=torch.bfloat16, device=src_dev)
dst = torch.zeros((L, 2, NB, BS, HKV, D), dtype=torch.bfloat16, device=dst_dev)
flat_src = torch.empty(256 << 20, dtype=torch.uint8, device=src_dev)
flat_dst = torch.empty(256 << 20, dtype=torch.uint8, device=dst_dev)
streams = [torch.cuda.Stream(src_dev, priority=-1) for _ in range(4)]
esz = src.element_size()
block, spitch, dpitch = src.stride(2) * esz, src.stride(1) * esz, dst.stride(1) * esz
rows = 2 * L
memcpy2d = cupy.cuda.runtime.memcpy2DAsync


def enqueue_rows(runs, k):
    """Every run's rows split into k contiguous parts, part j on stream j."""
    for s, d, n in runs:
        step = -(-rows // k)
        for j in range(k):
            r0, r1 = j * step, min(rows, (j + 1) * step)
            if r0 < r1:
                memcpy2d(dst.data_ptr() + r0 * dpitch + d * block, dpitch, src.data_ptr() + r0 * spitch + s * block,
                         spitch, n * block, r1 - r0, 3, streams[j].cuda_stream)


def enqueue_dealt(runs, k):
    """Whole runs dealt to k streams, biggest first onto the least loaded (one run: rows split)."""
    if len(runs) < k:
        return enqueue_rows(runs, k)
    load = [0] * k
    for s, d, n in sorted(runs, key=lambda r: -r[2]):
        j = load.index(min(load))
        load[j] += n
        memcpy2d(dst.data_ptr() + d * block, dpitch, src.data_ptr() + s * block, spitch, n * block, rows, 3,
                 streams[j].cuda_stream)


def enqueue_flat(k):
    part = flat_src.numel() // k
    for j in range(k):
        cupy.cuda.runtime.memcpyAsync(flat_dst.data_ptr() + j * part, flat_src.data_ptr() + j * part, part, 3,
                                      streams[j].cuda_stream)


def timed(enqueue, k):
    main = torch.cuda.current_stream(src_dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    gpu, host = [], []
    for i in range(40):
        torch.cuda.synchronize(src_dev)
        torch.cuda.synchronize(dst_dev)
        start.record(main)
        for st in streams[:k]:
            st.wait_stream(main)
        t0 = time.perf_counter()
        with cupy.cuda.Device(0):
            enqueue()
        t1 = time.perf_counter()
        for st in streams[:k]:
            main.wait_stream(st)
        end.record(main)
        end.synchronize()
        if i >= 10:
            gpu.append(start.elapsed_time(end))
            host.append((t1 - t0) * 1e3)
    return statistics.median(gpu), statistics.median(host)


def kernel(idx):
    with torch.cuda.stream(streams[0]):
        copy_blocks(src, dst, *idx, 0, L)


print("asyncEngineCount", cupy.cuda.runtime.getDeviceProperties(0)["asyncEngineCount"],
      torch.cuda.get_device_name(0))
nbytes = 128 * block * rows
cases = {"one run": (list(range(128)), list(range(NB - 128, NB))),
         **{f"churned seed {sd}": churned_ids(NB, BS, 128, sd) for sd in (2048, 7, 11)}}
for name, (s_ids, d_ids) in cases.items():
    runs = block_runs(s_ids, d_ids)
    print(f"\n{name}: {len(runs)} runs, lengths {sorted((r[2] for r in runs), reverse=True)}")
    for label, fn, k in [("rows on 1 stream (today)", lambda r=runs: enqueue_rows(r, 1), 1),
                         ("rows split over 2 streams", lambda r=runs: enqueue_rows(r, 2), 2),
                         ("rows split over 3 streams", lambda r=runs: enqueue_rows(r, 3), 3),
                         ("rows split over 4 streams", lambda r=runs: enqueue_rows(r, 4), 4),
                         ("runs dealt to 2 streams", lambda r=runs: enqueue_dealt(r, 2), 2)]:
        g, h = timed(fn, k)
        print(f"  {label:28s} gpu {g:.3f} ms  {nbytes / g / 1e6:6.1f} GB/s  enqueue {h:.3f} ms")
    idx = (torch.tensor(s_ids, device=src_dev), torch.tensor(d_ids, device=src_dev))
    g, h = timed(lambda i=idx: kernel(i), 1)
    print(f"  {'Triton kernel, all SMs':28s} gpu {g:.3f} ms  {nbytes / g / 1e6:6.1f} GB/s  enqueue {h:.3f} ms")
print()
for k in (1, 2, 4):
    g, h = timed(lambda k=k: enqueue_flat(k), k)
    print(f"flat 256 MiB over {k} stream(s): gpu {g:.3f} ms  {flat_src.numel() / g / 1e6:6.1f} GB/s")
