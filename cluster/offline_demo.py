"""`pdserve offline`: generate with the engine in this process (no cluster), printing speed."""

from __future__ import annotations

import argparse
import time

from cluster.builtin_model import ensure_builtin_model


def add_offline_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="*", default=["The history of the river", "In a small town,"])
    parser.add_argument("--model", help="model directory (default: the built-in tiny model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)


def run_offline(args: argparse.Namespace) -> int:
    from cluster.engine import LLM, SamplingParams

    model = args.model or str(ensure_builtin_model())
    llm = LLM(model, device=args.device)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    start = time.perf_counter()
    outputs = llm.generate(args.prompts, params)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(args.prompts, outputs, strict=True):
        print(f"--- {prompt!r} -> [{out.finish_reason}, {len(out.token_ids)} tokens]\n{out.text}")
    total = sum(len(o.token_ids) for o in outputs)
    print(f"{total} tokens in {elapsed:.2f} s ({total / elapsed:.1f} tokens/s)")
    return 0
