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
from typing import Any

from cluster.bench.metrics import percentile
from cluster.bench.report import metadata, run_dir, write_json
from cluster.bench.workload import parse_range
from cluster.engine.block_manager import BlockManager


def _runs(src: list[int], dst: list[int]) -> int:
    from cluster.transport.ipc_copy import block_runs

    return len(block_runs(src, dst))


class Churn:
    """A prefill side and a decode side, two real `BlockManager`s configured as the workers' are, under a
    replayed workload. `step()` advances one decode token per live request; `arrive()` hands one prompt over."""

    def __init__(self, prefill_blocks: int, decode_blocks: int, block_size: int) -> None:
        self.prefill = BlockManager(prefill_blocks, block_size)
        self.decode = BlockManager(decode_blocks, block_size, enable_prefix_caching=False,
                                   growth="lowest_id")  # as decode workers (LLMEngine without a prefix cache)
        self.live: list[tuple[int, list[int], list[int]]] = []  # (tokens left to generate, [tokens], blocks)

    def arrive(self, prompt: int, output: int) -> tuple[list[int], list[int]] | None:
        """The handoff of a `prompt`-token request that will generate `output` tokens: (source ids,
        destination ids), or None when either side is full. The source blocks are freed at once (sent)."""
        owed = sum(self.decode.blocks_needed(tokens[0] + left) - len(blocks) for left, tokens, blocks in self.live)
        if self.prefill.blocks_needed(prompt) > self.prefill.num_free_blocks or \
                self.decode.blocks_needed(prompt + output) > self.decode.num_free_blocks - owed:
            return None  # admitted requests can always grow to their full length: no waiting, no deadlock
        src, dst = self.prefill.allocate_blocks(prompt), self.decode.allocate_blocks(prompt)
        self.prefill.release_blocks(src)
        self.live.append((output, [prompt], dst))
        return src, list(dst)  # a copy: the live list grows as the request decodes

    def step(self) -> None:
        still: list[tuple[int, list[int], list[int]]] = []
        for left, tokens, blocks in self.live:
            tokens[0] += 1
            if self.decode.blocks_needed(tokens[0]) > len(blocks):
                blocks.append(self.decode.grow_block())
            if left > 1:
                still.append((left - 1, tokens, blocks))
            else:
                self.decode.release_blocks(blocks)
        self.live = still


def churn(churn_: Churn, transfers: int, input_range: tuple[int, int], output_range: tuple[int, int],
          arrival_prob: float, seed: int) -> list[tuple[list[int], list[int]]]:
    """Run arrivals (Bernoulli per step) and steps until `transfers` handoffs happened; their ids."""
    rng = random.Random(seed)
    done: list[tuple[list[int], list[int]]] = []
    while len(done) < transfers:
        if rng.random() < arrival_prob:
            ids = churn_.arrive(rng.randint(*input_range), rng.randint(*output_range))
            if ids is not None:
                done.append(ids)
        churn_.step()
    return done


def churned_ids(num_blocks: int, block_size: int, n_blocks: int, seed: int) -> tuple[list[int], list[int]]:
    """Source and destination ids of an `n_blocks` handoff between two caches of `num_blocks` blocks that have
    served a while (`bench kv --churned-ids`): prompts of n/2 to 2n blocks, 64-256 output tokens, arrivals
    keeping the decode side about half full."""
    c = Churn(num_blocks, num_blocks, block_size)
    tokens = n_blocks * block_size
    arrival = min(1.0, 0.5 * num_blocks / (160 * 1.25 * n_blocks + 1))
    churn(c, 200, (max(1, tokens // 2), 2 * tokens), (64, 256), arrival, seed)
    for _ in range(10_000):  # the handoff waits for room, as a reservation would
        ids = c.arrive(tokens, 1)
        if ids is not None:
            return ids
        c.step()
    raise RuntimeError(f"no room for a {n_blocks}-block handoff in {num_blocks}-block caches")


def replay(args: argparse.Namespace) -> list[dict[str, int]]:
    """One row per transfer: blocks, runs on the source side, on the destination side, and for the pair."""
    c = Churn(args.prefill_blocks, args.decode_blocks, args.block_size)
    ids = churn(c, args.transfers, parse_range(args.input_range), parse_range(args.output_range),
                args.arrival_prob, args.seed)
    return [{"blocks": len(src), "src_runs": _runs(src, src), "dst_runs": _runs(dst, dst),
             "pair_runs": _runs(src, dst)} for src, dst in ids]


def summarize(rows: list[dict[str, int]], max_runs: int) -> dict[str, Any]:
    kept = rows[len(rows) // 3:]
    out: dict[str, Any] = {"transfers": len(kept), "blocks_median": percentile([r["blocks"] for r in kept], 50)}
    for key in ("src_runs", "dst_runs", "pair_runs"):
        values = [r[key] for r in kept]
        out[key] = {"median": percentile(values, 50), "p90": percentile(values, 90)}
    out["share_copy_engine"] = sum(r["pair_runs"] <= max_runs for r in kept) / len(kept)
    return out


def run_blocks_bench(args: argparse.Namespace) -> int:
    """Replay, print the summary, write OUT/blocks-<time>/result.json."""
    from cluster.transport.ipc_copy import COPY_ENGINE_MAX_RUNS

    if parse_range(args.input_range) is None or parse_range(args.output_range) is None:
        raise ValueError("give --input-range LO,HI and --output-range LO,HI")
    if not 0 < args.arrival_prob <= 1 or args.transfers < 3:
        raise ValueError("--arrival-prob must be in (0, 1] and --transfers >= 3")
    summary = summarize(replay(args), COPY_ENGINE_MAX_RUNS)
    print(f"{summary['transfers']} transfers after warm-up, median {summary['blocks_median']:g} blocks each")
    for key in ("src_runs", "dst_runs", "pair_runs"):
        print(f"  {key:<9} median {summary[key]['median']:g}  p90 {summary[key]['p90']:g}")
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
