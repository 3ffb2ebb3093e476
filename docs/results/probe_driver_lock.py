"""Probe (on the GPU host: `python docs/results/probe_driver_lock.py`): does a thread that reads step results
with .tolist() (a pageable device-to-host copy) stall another thread's CUDA calls? Output: docs/benchmarks.md.

The "engine" thread loops: ~7 ms of GPU work, then reads a token tensor back in one of four ways (or burns
pure Python, for GIL contention alone). The probe thread meanwhile times what a KV receiver does per chunk:
allocate a buffer, a memset (stands in for NCCL's receive post), an index_copy_ (the scatter), an event.
Columns: p50 / p90 / max in ms.
"""

import statistics
import sys
import threading
import time

import torch

sys.setswitchinterval(0.0005)
dev = torch.device("cuda:0")
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
tok = torch.zeros(64, dtype=torch.long, device=dev)
pinned = torch.empty(64, dtype=torch.long).pin_memory()
side = torch.cuda.Stream(dev, priority=-1)
cache = torch.zeros(32, 2, 4096, 16 * 8 * 128, dtype=torch.bfloat16, device=dev)
idx = torch.arange(0, 512, 4, device=dev)
stop = threading.Event()


def engine(kind: str) -> None:
    while not stop.is_set():
        for _ in range(6):
            torch.mm(a, a)
        tok.add_(1)
        if kind == "tolist":
            tok.tolist()
        elif kind == "pinned_event":
            pinned.copy_(tok, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            ev.synchronize()
            pinned.tolist()
        elif kind == "stream_sync":
            torch.cuda.current_stream().synchronize()
            tok.tolist()
        elif kind == "python":
            t = time.perf_counter()
            while time.perf_counter() - t < 0.006:
                pass


def probe(n: int = 300) -> dict[str, tuple[float, float, float]]:
    res: dict[str, list[float]] = {"empty": [], "recv_like": [], "scatter": [], "record": [], "all": []}
    for _ in range(n):
        t0 = time.perf_counter()
        with torch.cuda.stream(side):
            buf = torch.empty(4 * 2 * 128 * 16 * 8 * 128, dtype=torch.bfloat16, device=dev)
            t1 = time.perf_counter()
            buf.zero_()
            t2 = time.perf_counter()
            cache[0:4].index_copy_(2, idx, buf.view(4, 2, 128, -1))
            t3 = time.perf_counter()
            ev = torch.cuda.Event()
            ev.record(side)
            ev.query()
            t4 = time.perf_counter()
        del buf
        for k, v in zip(res, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
            res[k].append(v * 1e3)
        time.sleep(0.001)
    side.synchronize()
    return {k: (statistics.median(v), sorted(v)[int(len(v) * 0.9)], max(v)) for k, v in res.items()}


for kind in ("idle", "python", "tolist", "stream_sync", "pinned_event"):
    stop.clear()
    th = None
    if kind != "idle":
        th = threading.Thread(target=engine, args=(kind,), daemon=True)
        th.start()
        time.sleep(0.2)
    r = probe()
    stop.set()
    if th is not None:
        th.join()
    torch.cuda.synchronize()
    print(f"{kind:13s} " + "  ".join(f"{k} {p50:.3f}/{p90:.3f}/{mx:.1f}" for k, (p50, p90, mx) in r.items()))
