"""`pdserve bench engine`: offline throughput of our engine, optionally against transformers on the same weights.

The workload is random token-id prompts (special tokens excluded) with `ignore_eos=True`, so every request
produces exactly its requested number of tokens; greedy, or temperature sampling with per-request seeds.
Engine construction and a warm-up generate on different prompts are not timed; the timed part is one
`LLM.generate` over all prompts (CUDA events after a synchronize on GPUs). With `--max-concurrency N` it is
instead the closed loop of `bench serve --max-concurrency N`, in this process (`engine_closed_loop`).
"""

from __future__ import annotations

import argparse
import gc
from typing import Any

import torch

from cluster.bench.hf_baseline import BaselineSettings, run_transformers
from cluster.bench.report import DeviceTimer, metadata, run_dir, write_json
from cluster.bench.workload import LengthSpec, parse_range, random_prompts

ENGINE_FLAGS = ("num_kv_blocks", "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization",
                "enforce_eager", "block_size", "kv_cache_memory_gb")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig keyword arguments given on the command line (unset flags keep the engine's defaults)."""
    return {k: getattr(args, k) for k in ENGINE_FLAGS if getattr(args, k, None) is not None}


def throughput(wall_s: float, num_requests: int, input_tokens: int, output_tokens: int) -> dict[str, float]:
    """Requests/s, output tokens/s and total (prompt + output) tokens/s over `wall_s`."""
    t = max(wall_s, 1e-12)
    return {"wall_s": wall_s, "requests_per_s": num_requests / t, "output_tokens_per_s": output_tokens / t,
            "total_tokens_per_s": (input_tokens + output_tokens) / t,
            "input_tokens": input_tokens, "output_tokens": output_tokens}


def _free_cuda(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run_engine_bench(args: argparse.Namespace) -> int:
    """Run the benchmark described by `args`; write OUT/engine-<time>/result.json."""
    from cluster.engine import LLM, SamplingParams
    from cluster.engine.models.loader import read_model_spec

    device, seed = args.device, args.seed
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    spec = read_model_spec(args.model)
    lengths = LengthSpec(args.input_len, args.output_len, args.range_ratio, parse_range(args.input_range),
                         parse_range(args.output_range))
    lengths.check_fits(spec.max_position_embeddings)
    pairs = lengths.sample(args.num_prompts, seed)
    special = {*spec.eos_token_ids, *([spec.bos_token_id] if spec.bos_token_id is not None else [])}
    prompts = random_prompts([i for i, _ in pairs], spec.vocab_size, seed + 1, special)
    out_lens = [o for _, o in pairs]
    in_lens = [i for i, _ in pairs]  # warm-up: other prompts (no prefix-cache hits), one of the longest length
    warm = random_prompts([max(in_lens), *in_lens[:max(args.num_warmup_prompts, 1) - 1]], spec.vocab_size,
                          seed + 2, special)
    warm_tokens = min(out_lens[:len(warm)] + [16])
    meta = metadata("engine", args, device, args.model)

    def params(n: int, i: int) -> SamplingParams:
        sampled = args.temperature > 0
        return SamplingParams(max_tokens=n, temperature=args.temperature, ignore_eos=True,
                              seed=seed + i if sampled else None)

    llm = LLM(args.model, device=device, dtype=args.dtype, seed=seed, **engine_kwargs(args))
    dtype = llm.engine.dtype
    llm.generate(warm, [params(warm_tokens, i) for i in range(len(warm))])
    all_params = [params(n, i) for i, n in enumerate(out_lens)]
    if args.max_concurrency:
        return _closed_loop(args, llm, prompts, all_params, meta)
    outs, secs = DeviceTimer(device).time(lambda: llm.generate(prompts, all_params, use_tqdm=True))
    ours_counts = [len(o.token_ids) for o in outs]
    ours = {"engine_config": dict(vars(llm.engine.config)),
            "num_kv_blocks_allocated": llm.engine.block_manager.num_usable_blocks,
            "num_preemptions": llm.engine.stats().num_preemptions,
            **throughput(secs, len(prompts), sum(map(len, prompts)), sum(ours_counts))}
    llm = outs = None  # type: ignore[assignment]
    _free_cuda(device)  # the engine's weights and KV cache go before transformers loads its copy

    result: dict[str, Any] = {**meta, "dtype": str(dtype).removeprefix("torch."), "workload": {
        "num_prompts": len(prompts), "input_lens": summary_lens([len(p) for p in prompts]),
        "output_lens": summary_lens(out_lens), "temperature": args.temperature, "ignore_eos": True,
        "num_warmup_prompts": len(warm)}, "pdserve": ours}
    problems = [f"pdserve produced {sum(ours_counts)} tokens, expected {sum(out_lens)}"] \
        if ours_counts != out_lens else []
    print(f"pdserve:      {_line(ours)}")
    if args.baseline == "transformers":
        settings = BaselineSettings(max_num_seqs=args.max_num_seqs or 256, num_blocks=args.hf_num_blocks,
                                    max_batch_tokens=args.hf_max_batch_tokens, block_size=args.hf_block_size,
                                    attn_implementation=args.hf_attn_implementation, api=args.hf_api)
        try:
            base = run_transformers(args.model, device, dtype, prompts, out_lens, warm, args.temperature, seed,
                                    settings)
        except Exception as exc:  # noqa: BLE001 - keep our measured numbers; report the baseline's failure
            problems.append(f"transformers baseline failed: {type(exc).__name__}: {exc}")
            result["baseline"] = {"name": "transformers", "error": problems[-1]}
        else:
            counts = base.pop("output_token_counts")
            if sum(counts) != sum(out_lens):
                problems.append(f"transformers produced {sum(counts)} tokens, expected {sum(out_lens)}")
            base.update(throughput(base["wall_s"], len(prompts), sum(map(len, prompts)), sum(counts)))
            result["baseline"] = {"name": "transformers", **base}
            result["ratio_vs_baseline"] = {k: ours[k] / base[k] for k in
                                           ("output_tokens_per_s", "total_tokens_per_s", "requests_per_s")}
            print(f"transformers: {_line(base)}  [{base['api']}]")
            ratio = result["ratio_vs_baseline"]["output_tokens_per_s"]
            print(f"ratio pdserve/transformers (output tokens/s): {ratio:.2f}x")
    result["problems"] = problems
    path = write_json(run_dir(args.out, "engine") / "result.json", result)
    print(f"wrote {path}")
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0


def _closed_loop(args: argparse.Namespace, llm: Any, prompts: list[list[int]], params: list[Any],
                 meta: dict[str, Any]) -> int:
    from cluster.bench.engine_closed_loop import closed_loop_result

    m = closed_loop_result(llm.engine, prompts, params, args.max_concurrency)
    print(f"pdserve closed loop, concurrency {args.max_concurrency}: {m['completed']}/{m['num_requests']} ok, "
          f"{m['output_token_throughput']:.1f} out tok/s | TTFT p50 {m['ttft_ms']['p50']:.1f} ms | "
          f"TPOT p50 {m['tpot_ms']['p50']:.2f} ms | ITL p50 {m['itl_ms']['p50']:.2f} ms")
    path = write_json(run_dir(args.out, "engine") / "result.json",
                      {**meta, "engine_config": dict(vars(llm.engine.config)), "closed_loop": m})
    print(f"wrote {path}")
    return 0 if m["failed"] == 0 else 1


def summary_lens(xs: list[int]) -> dict[str, float]:
    return {"min": min(xs), "mean": sum(xs) / len(xs), "max": max(xs), "total": sum(xs)}


def _line(r: dict[str, Any]) -> str:
    return (f"{r['output_tokens_per_s']:.1f} output tok/s, {r['total_tokens_per_s']:.1f} total tok/s, "
            f"{r['requests_per_s']:.2f} req/s, {r['wall_s']:.2f} s")
