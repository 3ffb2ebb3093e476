"""`pdserve bench kv`: KV handoff between two processes against raw point-to-point of the same bytes.

Two spawned processes (see `kv_worker`): the sender on `cuda:A` (or the CPU), the receiver on `cuda:B` (A may
equal B: both on one GPU, cuda_ipc within a device, against a copy within the GPU as the raw reference);
both see every GPU and pick theirs by index. Each allocates a paged KV cache for the model shape, sized
for the longest prompt plus spare blocks; the sender fills its cache with seeded random values. Per
(transport, prompt length) the sender times `send()` of the prompt's blocks into blocks the receiver has
`expect()`ed: scattered ids on both sides; one run of consecutive ids with --contiguous-ids; or with
--churned-ids what the workers' allocators hand out after serving a while (caches of 16 longest prompts).
The first transfer is checked bit for bit (and that nothing else in the receiver's cache changed). In the
same processes, on the same devices, a plain torch.distributed send of one contiguous tensor of the same
byte count plus a 1-element ack (gloo on CPU, NCCL on CUDA) is the raw reference: `ratio = raw_p2p_ms /
handoff_ms` is the fraction of raw bandwidth the handoff achieves. No weights are loaded: only the shape
(config.json or a named shape) is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import queue
import time
from typing import Any

from cluster.bench.kv_plan import Plan
from cluster.bench.kv_prefill import print_prefill_table
from cluster.bench.kv_prefill import summarize as summarize_prefill
from cluster.bench.kv_worker import worker
from cluster.bench.metrics import percentile
from cluster.bench.report import device_name, metadata, print_rows, run_dir, spec_summary, write_json

CPU_TRANSPORTS, CUDA_TRANSPORTS = ("gloo", "grpc"), ("nccl", "cuda_ipc", "grpc")
_SPARE_BLOCKS = 8
_CHURN_ROOM = 16


def parse_ints(text: str, what: str) -> list[int]:
    """'512,2048,8192' -> [512, 2048, 8192] (each >= 1)."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"{what} must be integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what} must be one or more integers >= 1, got {text!r}")
    return values


def parse_transports(text: str | None, device: str) -> list[str]:
    """The transports to run (default: every one that fits `device`), checked against the registry."""
    from cluster.transport import transport_names

    names = [t for t in (text or "").replace(" ", "").split(",") if t] or list(
        CUDA_TRANSPORTS if device == "cuda" else CPU_TRANSPORTS)
    unknown = [t for t in names if t not in transport_names()]
    if unknown:
        raise ValueError(f"unknown transport(s) {', '.join(unknown)}; known: {', '.join(transport_names())}")
    if device == "cpu" and (gpu_only := [t for t in names if t in ("nccl", "cuda_ipc")]):
        raise ValueError(f"{', '.join(gpu_only)} need --device cuda")
    return list(dict.fromkeys(names))


def resolve_spec(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The ModelSpec from --model (config.json only) or --shape (arch from the shape), and its summary."""
    from cluster.engine.model_spec import ModelSpec

    if args.model:
        from cluster.engine.models.loader import read_model_spec

        spec = read_model_spec(args.model)
        return spec, {"path": str(args.model), **spec_summary(spec)}
    from cluster.engine.make_model import SHAPES, build_config

    if args.shape not in SHAPES:
        raise ValueError(f"unknown shape {args.shape!r}; valid: {', '.join(SHAPES)}")
    arch = SHAPES[args.shape].archs[0]
    spec = ModelSpec.from_hf_config(build_config(arch, args.shape, args.dtype))
    return spec, {"shape": args.shape, "arch": arch, **spec_summary(spec)}


def _devices(device: str, gpus: str, transports: list[str]) -> tuple[str, str]:
    """(sender, receiver) devices. One GPU for both (`--gpus 0,0`) is what 1P+1D on one GPU runs (cuda_ipc
    within a device); NCCL cannot pair a GPU with itself."""
    if device == "cpu":
        return "cpu", "cpu"
    import torch

    try:
        a, b = (int(x) for x in gpus.split(","))
    except ValueError:
        raise ValueError(f"--gpus must be two GPU indices SENDER,RECEIVER, got {gpus!r}") from None
    if min(a, b) < 0:
        raise ValueError(f"--gpus needs GPU indices >= 0, got {gpus!r}")
    if a == b and "nccl" in transports:
        raise ValueError("nccl cannot pair a GPU with itself: give two GPUs (--gpus 0,1) or leave nccl out "
                         "(--transport cuda_ipc,grpc)")
    count = torch.cuda.device_count()
    if max(a, b) >= count:
        raise ValueError(f"--gpus {a},{b}: this host has {count} visible CUDA GPU(s)")
    return f"cuda:{a}", f"cuda:{b}"


def _spawn(plan: Plan, deadline_s: float) -> dict[str, Any]:
    """Run sender and receiver; return the sender's result or raise with the first error."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    ends = ctx.Pipe()
    procs = [ctx.Process(target=worker, args=(rank, plan, ends[rank], results), name=f"kv-bench-{rank}",
                         daemon=True) for rank in (0, 1)]
    for p in procs:
        p.start()
    for end in ends:  # ours closed: a dead process then means EOF for its peer, not a hang
        end.close()
    out: dict[str, Any] | None = None
    error: str | None = None
    done = 0
    deadline = time.monotonic() + deadline_s
    try:
        while done < 2 and error is None:
            try:
                kind, value = results.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    error = f"the benchmark did not finish within {deadline_s:.0f}s"
                elif dead := [p for p in procs if p.exitcode not in (None, 0)]:
                    error = f"{dead[0].name} exited with code {dead[0].exitcode} and no message"
                continue
            if kind == "error":
                error = value
            else:
                done += 1
                out = value if kind == "result" else out
    finally:
        for p in procs:
            p.join(10.0 if error is None else 3.0)
            if p.is_alive():
                p.kill()
                p.join(5.0)
    if error is not None:
        raise RuntimeError(error)
    assert out is not None
    return out


def _stats(times_s: list[float], nbytes: int) -> dict[str, Any]:
    ms = [t * 1e3 for t in times_s]
    med = percentile(ms, 50)
    return {"median_ms": med, "p10_ms": percentile(ms, 10), "p90_ms": percentile(ms, 90),
            "gbps": nbytes / (med / 1e3) / 1e9 if med > 0 else math.nan, "times_ms": ms}


def summarize_rows(out: dict[str, Any], layout: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows per (transport, prompt length) and per prompt length (raw), with bytes, latencies, GB/s, ratio."""
    raw_rows, raw_by_len = [], {}
    for p, r in out["raw"].items():
        blocks = layout.blocks_for_tokens(p)
        nbytes = blocks * layout.bytes_per_block
        s = _stats(r["times_s"], nbytes)
        raw_by_len[p] = s
        raw_rows.append({"prompt_len": p, "blocks": blocks, "bytes": nbytes, "repeats": len(r["times_s"]),
                         "warmup": r["warmup"], "capped": r["capped"], **s})
    rows = []
    for r in out["rows"]:
        p = r["prompt_len"]
        blocks = layout.blocks_for_tokens(p)
        row: dict[str, Any] = {"transport": r["transport"], "prompt_len": p, "blocks": blocks,
                               "bytes": blocks * layout.bytes_per_block}
        if "error" in r:
            rows.append({**row, "error": r["error"]})
            continue
        s, raw = _stats(r["times_s"], row["bytes"]), raw_by_len[p]
        rows.append({**row, "repeats": len(r["times_s"]), "warmup": r["warmup"], "capped": r["capped"],
                     "verified": r["verified"], "handoff_ms": s["median_ms"], "handoff_p10_ms": s["p10_ms"],
                     "handoff_p90_ms": s["p90_ms"], "handoff_gbps": s["gbps"], "raw_p2p_ms": raw["median_ms"],
                     "raw_gbps": raw["gbps"], "ratio": raw["median_ms"] / s["median_ms"],
                     "handoff_times_ms": s["times_ms"]})
    return raw_rows, rows


def print_table(rows: list[dict[str, Any]], raw_backend: str) -> None:
    """One line per (transport, prompt length)."""
    head = (f"{'transport':<9} {'prompt':>6} {'MiB':>8} {'handoff ms p50 [p10-p90]':>26} {'GB/s':>7} "
            f"{'raw ' + raw_backend + ' ms':>12} {'raw GB/s':>8} {'ratio':>6} {'reps':>5}")

    def body(r: dict[str, Any]) -> str:
        span = f"{r['handoff_ms']:.3f} [{r['handoff_p10_ms']:.3f}-{r['handoff_p90_ms']:.3f}]"
        reps = f"{r['repeats']}{'*' if r['capped'] else ''}"
        return (f"{span:>26} {r['handoff_gbps']:>7.2f} {r['raw_p2p_ms']:>12.3f} {r['raw_gbps']:>8.2f} "
                f"{r['ratio']:>6.2f} {reps:>5}")

    print_rows(head, rows, lambda r: f"{r['transport']:<9} {r['prompt_len']:>6} {r['bytes'] / 2**20:>8.1f}", body)
    if any(r.get("capped") for r in rows):
        print("* repeats capped by --case-budget-s (slow case)")


def run_kv_bench(args: argparse.Namespace) -> int:
    """Run the benchmark described by `args`; write OUT/kv-<time>/result.json; 1 if any case failed."""
    import torch

    from cluster.engine.kv_layout import KVLayout

    if (args.model is None) == (args.shape is None):
        raise ValueError("give exactly one of --model DIR and --shape NAME")
    if args.prefill and args.model is None:
        raise ValueError("--prefill runs the model: give --model DIR with its weights")
    if args.profile and not args.prefill:
        raise ValueError("--profile profiles the --prefill runs: give --prefill too")
    if min(args.repeats, args.block_size, args.min_repeats) < 1 or args.warmup < 0 or args.case_budget_s <= 0:
        raise ValueError("--repeats, --min-repeats and --block-size must be >= 1, --warmup >= 0, budget > 0")
    prompt_lens = parse_ints(str(args.prompt_len), "--prompt-len")
    transports = parse_transports(args.transport, args.device)
    devices = _devices(args.device, args.gpus, transports)
    spec, model = resolve_spec(args)
    layout = KVLayout(num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                      block_size=args.block_size, dtype=getattr(torch, args.dtype))
    if args.contiguous_ids and args.churned_ids:
        raise ValueError("give at most one of --contiguous-ids and --churned-ids")
    # churned ids need room to churn in: caches of _CHURN_ROOM longest prompts
    num_blocks = layout.blocks_for_tokens(max(prompt_lens)) * (_CHURN_ROOM if args.churned_ids else 1) \
        + _SPARE_BLOCKS
    one_gpu = args.device == "cuda" and devices[0] == devices[1]
    # the raw reference's group also carries the verification; on one GPU it is gloo (through host memory)
    raw_backend = "nccl" if args.device == "cuda" and not one_gpu else "gloo"
    plan = Plan(layout=layout, num_blocks=num_blocks, devices=devices, raw_backend=raw_backend,
                transports=tuple(transports), prompt_lens=tuple(prompt_lens), warmup=args.warmup,
                repeats=args.repeats, min_repeats=args.min_repeats, case_budget_s=args.case_budget_s,
                send_timeout_s=args.send_timeout, seed=args.seed,
                prefill_model=str(args.model) if args.prefill else None, receiver_busy=args.receiver_busy,
                contiguous_ids=args.contiguous_ids, churned_ids=args.churned_ids,
                switch_interval_s=args.switch_interval_ms / 1e3 if args.switch_interval_ms else None)
    meta = metadata("kv", args, args.device, args.model)
    folder = run_dir(args.out, "kv")
    if args.profile:
        plan = dataclasses.replace(plan, profile_dir=str(folder / "profile"))
    t0 = time.perf_counter()
    out = _spawn(plan, args.deadline)
    wall = time.perf_counter() - t0
    raw_rows, rows = summarize_rows(out, layout)
    prefill = summarize_prefill(out["prefill"])
    problems = [f"{r['transport']} @ {r['prompt_len']}: {r['error']}" for r in rows + prefill if "error" in r]
    result = {
        **meta, "model": model, "dtype": args.dtype,
        "layout": {"num_layers": layout.num_layers, "num_kv_heads": layout.num_kv_heads,
                   "head_dim": layout.head_dim, "block_size": layout.block_size,
                   "bytes_per_block": layout.bytes_per_block, "cache_blocks": num_blocks},
        "devices": {"sender": devices[0], "receiver": devices[1],
                    "names": [device_name(d) for d in devices]},
        "raw_backend": raw_backend,
        "raw_method": ("one device-to-device copy of a contiguous tensor of the same bytes on the GPU (sender)"
                       if one_gpu else "one contiguous tensor sender->receiver + 1-element ack back, same "
                                       "processes/devices"),
        "receiver_busy": args.receiver_busy, "contiguous_ids": args.contiguous_ids, "churned_ids": args.churned_ids,
        "switch_interval_ms": args.switch_interval_ms,
        "wall_s": wall, "raw": raw_rows, "results": rows, "prefill": prefill, "problems": problems,
    }
    path = write_json(folder / "result.json", result)
    print(f"KV handoff {devices[0]} -> {devices[1]}, {args.dtype}, {layout.bytes_per_block / 2**20:.3f} MiB/block "
          f"({spec.num_layers} layers x {spec.num_kv_heads} kv heads x {spec.head_dim}, block {args.block_size})")
    print_table(rows, "copy" if one_gpu else raw_backend)
    if prefill:
        print_prefill_table(prefill)
    print(f"wrote {path} ({wall:.1f}s)")
    for p in problems:
        print(f"problem: {p}")
    return 1 if problems else 0
