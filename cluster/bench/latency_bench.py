"""`pdserve bench latency`: decode step time at a given batch and context, prefill time, and both against the
hardware limits measured in the same run.

Decode: B requests with C-token random prompts and max_tokens K+1 are stepped until every one has its
first token (all prefilled and decoding); then K decode steps are timed one by one (each a batch of B).
A warm-up round of the same shape runs first and is aborted. Prefill: one prompt of `--prefill-len`
tokens with max_tokens 1, i.e. one prefill step, timed `--prefill-repeats` times after one warm-up.

Ratios: decode floor = (weight bytes read + KV bytes of B*C tokens) / measured copy bandwidth (the
embedding table is not counted unless tied to the LM head: decode reads only B of its rows); prefill
FLOPs = 2 * num_params * tokens, compared with the measured matmul rate.
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Any

from tqdm import tqdm

from cluster.bench import hw_limits
from cluster.bench.metrics import summarize
from cluster.bench.report import DeviceTimer, metadata, run_dir, write_json
from cluster.bench.workload import random_prompts


def _decode_round(engine: Any, tag: str, batch: int, context: int, steps: int, seed: int, timer: DeviceTimer,
                  bar: tqdm | None) -> tuple[list[float], list[int]]:
    """Start `batch` requests, prefill them all, then time `steps` decode steps; abort leftovers."""
    from cluster.engine import SamplingParams

    spec = engine.spec
    prompts = random_prompts([context] * batch, spec.vocab_size, seed, spec.eos_token_ids)
    ids = [f"{tag}-{i}" for i in range(batch)]
    for rid, p in zip(ids, prompts, strict=True):
        engine.add_request(rid, p, SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True))
    started: set[str] = set()
    try:
        for _ in range(batch * context + 8):  # every prefill step makes progress; this bounds a stuck loop
            if len(started) == batch:
                break
            started.update(o.request_id for o in engine.step() if o.new_token_ids)
        else:
            raise RuntimeError("requests did not all reach decoding; is the KV cache too small?")
        times, sizes = [], []
        for _ in range(steps):
            outs, secs = timer.time(engine.step)
            times.append(secs)
            sizes.append(len(outs))
            if bar is not None:
                bar.update(1)
        return times, sizes
    finally:
        for rid in ids:
            engine.abort(rid)


def _prefill_times(engine: Any, length: int, repeats: int, seed: int, timer: DeviceTimer, bar: tqdm) -> list[float]:
    from cluster.engine import SamplingParams

    times = []
    for r in range(repeats + 1):  # the first is a warm-up
        prompt = random_prompts([length], engine.spec.vocab_size, seed + 1000 + r, engine.spec.eos_token_ids)[0]
        engine.add_request(f"prefill-{r}", prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        outs, secs = timer.time(engine.step)
        if not any(o.request_id == f"prefill-{r}" and o.finished for o in outs):
            raise RuntimeError("the prefill did not finish in one step")
        if r:
            times.append(secs)
            bar.update(1)
    return times


def roofline(spec: Any, elem_bytes: int, batch: int, context: int, step_s: float, prefill_tokens: int,
             prefill_s: float, limits: hw_limits.HardwareLimits) -> dict[str, float]:
    """Decode floor from bandwidth, prefill FLOP rate vs the matmul rate, and our ratios to both."""
    embed = 0 if spec.tie_word_embeddings else spec.vocab_size * spec.hidden_size
    weight_bytes = (spec.num_params - embed) * elem_bytes
    kv_bytes = batch * context * spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * elem_bytes
    floor_s = (weight_bytes + kv_bytes) / limits.bandwidth_bytes_per_s
    flops = 2 * spec.num_params * prefill_tokens
    achieved = flops / prefill_s
    return {"weight_bytes_read": weight_bytes, "kv_bytes_read": kv_bytes, "decode_floor_ms": floor_s * 1e3,
            "decode_step_over_floor": step_s / floor_s, "decode_bandwidth_fraction": floor_s / step_s,
            "prefill_flops": flops, "prefill_achieved_tflops": achieved / 1e12,
            "prefill_fraction_of_matmul": achieved / limits.matmul_flops_per_s}


def run_latency_bench(args: argparse.Namespace) -> int:
    """Run the benchmark described by `args`; write OUT/latency-<time>/result.json."""
    import torch

    from cluster.config import EngineConfig
    from cluster.engine import LLMEngine
    from cluster.engine.models.loader import read_model_spec

    b, c, k, device = args.batch_size, args.context_len, args.steps, args.device
    if min(b, c, k, args.prefill_len, args.prefill_repeats) < 1:
        raise ValueError("batch size, context length, steps, prefill length and repeats must be >= 1")
    spec = read_model_spec(args.model)
    if max(c + k + 1, args.prefill_len + 1) > spec.max_position_embeddings:
        raise ValueError(f"context + steps exceed the model's maximum length {spec.max_position_embeddings}")
    meta = metadata("latency", args, device, args.model)
    bs = args.block_size
    needed = max(b * math.ceil((c + k + 2) / bs), math.ceil((args.prefill_len + 2) / bs)) + 4
    config = EngineConfig(model=args.model, device=device, dtype=args.dtype, block_size=bs,
                          num_kv_blocks=args.num_kv_blocks or needed, max_num_seqs=max(b, args.max_num_seqs or 0),
                          max_num_batched_tokens=args.max_num_batched_tokens or 8192,
                          enable_prefix_caching=False, enforce_eager=bool(args.enforce_eager), seed=args.seed)
    dtype = getattr(torch, config.torch_dtype_name)
    limits = hw_limits.measure(device, dtype, args.copy_bytes, args.matmul_n)  # before the engine takes memory
    engine = LLMEngine(config)
    timer = DeviceTimer(device)
    with tqdm(total=k + args.prefill_repeats, desc="latency") as bar:
        _decode_round(engine, "warmup", b, c, min(k, args.warmup_steps), args.seed + 7, timer, None)
        times, sizes = _decode_round(engine, "decode", b, c, k, args.seed, timer, bar)
        prefill = _prefill_times(engine, args.prefill_len, args.prefill_repeats, args.seed, timer, bar)
    engine.check_block_accounting()
    step_ms = [t * 1e3 for t in times]
    step_s, prefill_s = statistics.median(times), statistics.median(prefill)
    elem = torch.empty((), dtype=dtype).element_size()
    result = {
        **meta, "dtype": config.torch_dtype_name,
        "settings": {"batch_size": b, "context_len": c, "steps": k, "prefill_len": args.prefill_len,
                     "block_size": bs, "num_kv_blocks": config.num_kv_blocks, "warmup_steps": args.warmup_steps},
        "decode": {"step_ms": summarize(step_ms), "median_ms": step_s * 1e3, "p90_ms": summarize(step_ms)["p90"],
                   "tokens_per_s": b / step_s, "batch_sizes": sorted(set(sizes)),
                   "num_preemptions": engine.stats().num_preemptions, "all_steps_full_batch": set(sizes) == {b}},
        "prefill": {"tokens": args.prefill_len, "times_ms": [t * 1e3 for t in prefill],
                    "median_ms": prefill_s * 1e3, "tokens_per_s": args.prefill_len / prefill_s},
        "hardware": limits.to_dict(),
        "roofline": roofline(spec, elem, b, c, step_s, args.prefill_len, prefill_s, limits),
    }
    path = write_json(run_dir(args.out, "latency") / "result.json", result)
    d, p, r, hw = result["decode"], result["prefill"], result["roofline"], result["hardware"]
    print(f"decode  B={b} C={c}: median {d['median_ms']:.3f} ms/step, p90 {d['p90_ms']:.3f} ms "
          f"({d['tokens_per_s']:.0f} tok/s); floor {r['decode_floor_ms']:.3f} ms at "
          f"{hw['bandwidth_gb_per_s']:.0f} GB/s -> {r['decode_step_over_floor']:.2f}x the floor")
    print(f"prefill {args.prefill_len} tokens: {p['median_ms']:.2f} ms ({p['tokens_per_s']:.0f} tok/s), "
          f"{r['prefill_achieved_tflops']:.2f} TFLOP/s = {100 * r['prefill_fraction_of_matmul']:.1f}% of "
          f"matmul {hw['matmul_tflops']:.2f} TFLOP/s")
    print(f"wrote {path}")
    if not result["decode"]["all_steps_full_batch"]:
        print("warning: some decode steps did not run the whole batch (preemption or max_num_seqs)")
    return 0
