"""`pdserve bench blocks`: how fragmented a handoff's KV block ids are once the caches churn.

The cuda_ipc transport copies each run of block ids that are consecutive on BOTH sides as one copy-engine
copy, up to `COPY_ENGINE_MAX_RUNS` runs; more runs go through the copy kernel (2K prompt on H200s: 0.88 vs
1.25 ms, docs/benchmarks.md). Which path served requests take depends on the allocator, not the GPU, so this
measures it on any machine: a workload's lengths replayed through two real `BlockManager`s, no model.
- prefill side: allocates each prompt, frees it once sent (the next arrival's turn);
- decode side: reserves the prompt, grows one block per `block_size` generated tokens (one token per live
  request per step), frees everything when the output is done.
Arrivals are Bernoulli per step. Reported after the first third (warm-up): runs per transfer on each side and
for the pair, and the share of transfers that fit the copy-engine path.
"""

from __future__ import annotations

import argparse
import random
import statistics
from typing import Any

from cluster.bench.report import metadata, run_dir, write_json
from cluster.bench.workload import parse_range
from cluster.engine.block_manager import BlockManager


def _runs(src: list[int], dst: list[int]) -> int:
    from cluster.transport.cuda_ipc import block_runs

    return len(block_runs(src, dst))


def replay(args: argparse.Namespace) -> list[dict[str, int]]:
    """One row per transfer: blocks, runs on the source side, on the destination side, and for the pair."""
    rng = random.Random(args.seed)
    (in_lo, in_hi), (out_lo, out_hi) = parse_range(args.input_range), parse_range(args.output_range)
    prefill = BlockManager(args.prefill_blocks, args.block_size)
    decode = BlockManager(args.decode_blocks, args.block_size, enable_prefix_caching=False)  # as decode workers
    live: list[tuple[int, list[int], list[int]]] = []  # (tokens left to generate, tokens so far, blocks)
    rows: list[dict[str, int]] = []
    while len(rows) < args.transfers:
        if rng.random() < args.arrival_prob:
            prompt, output = rng.randint(in_lo, in_hi), rng.randint(out_lo, out_hi)
            if prefill.blocks_needed(prompt) <= prefill.num_free_blocks and \
                    decode.blocks_needed(prompt + output) <= decode.num_free_blocks:
                src, dst = prefill.allocate_blocks(prompt), decode.allocate_blocks(prompt)
                rows.append({"blocks": len(src), "src_runs": _runs(src, src), "dst_runs": _runs(dst, dst),
                             "pair_runs": _runs(src, dst)})
                prefill.release_blocks(src)
                live.append((output, [prompt], dst))
        still: list[tuple[int, list[int], list[int]]] = []
        for left, tokens, blocks in live:
            tokens[0] += 1
            if decode.blocks_needed(tokens[0]) > len(blocks):
                blocks.append(decode.grow_block())
            if left > 1:
                still.append((left - 1, tokens, blocks))
            else:
                decode.release_blocks(blocks)
        live = still
    return rows


def summarize(rows: list[dict[str, int]], max_runs: int) -> dict[str, Any]:
    kept = rows[len(rows) // 3:]
    out: dict[str, Any] = {"transfers": len(kept), "blocks_median": statistics.median(r["blocks"] for r in kept)}
    for key in ("src_runs", "dst_runs", "pair_runs"):
        values = sorted(r[key] for r in kept)
        out[key] = {"median": statistics.median(values), "p90": values[int(0.9 * (len(values) - 1))]}
    out["share_copy_engine"] = sum(r["pair_runs"] <= max_runs for r in kept) / len(kept)
    return out


def run_blocks_bench(args: argparse.Namespace) -> int:
    """Replay, print the summary, write OUT/blocks-<time>/result.json."""
    from cluster.transport.cuda_ipc import COPY_ENGINE_MAX_RUNS

    if parse_range(args.input_range) is None or parse_range(args.output_range) is None:
        raise ValueError("give --input-range LO,HI and --output-range LO,HI")
    if not 0 < args.arrival_prob <= 1 or args.transfers < 3:
        raise ValueError("--arrival-prob must be in (0, 1] and --transfers >= 3")
    summary = summarize(replay(args), COPY_ENGINE_MAX_RUNS)
    print(f"{summary['transfers']} transfers after warm-up, median {summary['blocks_median']:g} blocks each")
    for key in ("src_runs", "dst_runs", "pair_runs"):
        print(f"  {key:<9} median {summary[key]['median']:g}  p90 {summary[key]['p90']}")
    print(f"  share with <= {COPY_ENGINE_MAX_RUNS} runs (cuda_ipc copy-engine path): "
          f"{100 * summary['share_copy_engine']:.0f}%")
    result = {**metadata("blocks", args, "cpu", None), "copy_engine_max_runs": COPY_ENGINE_MAX_RUNS, **summary}
    print(f"wrote {write_json(run_dir(args.out, 'blocks') / 'result.json', result)}")
    return 0


def add_blocks_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-range", default="1024,4096", help="LO,HI: prompt tokens uniform in [LO, HI]")
    p.add_argument("--output-range", default="64,256", help="LO,HI: generated tokens uniform in [LO, HI]")
    p.add_argument("--transfers", type=int, default=900, help="handoffs to replay (the first third is warm-up)")
    p.add_argument("--arrival-prob", type=float, default=0.3, help="chance of an arrival per decode step")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--prefill-blocks", type=int, default=20000, help="KV blocks of the prefill worker's cache")
    p.add_argument("--decode-blocks", type=int, default=50000, help="KV blocks of the decode worker's cache")
