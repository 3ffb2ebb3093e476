"""Arguments of `pdserve bench {engine,latency,serve,kv,compare,blocks,soak}`; each runner is imported when it runs."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

_RUNNERS = {
    "engine": ("cluster.bench.engine_bench", "run_engine_bench"),
    "latency": ("cluster.bench.latency_bench", "run_latency_bench"),
    "serve": ("cluster.bench.serve_bench", "run_serve_bench"),
    "kv": ("cluster.bench.kv_bench", "run_kv_bench"),
    "compare": ("cluster.bench.compare_bench", "run_compare_bench"),
    "blocks": ("cluster.bench.blocks_bench", "run_blocks_bench"),
    "soak": ("cluster.bench.soak_bench", "run_soak_bench"),
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="bench-results", help="folder for results (default: bench-results/)")
    p.add_argument("--seed", type=int, default=0, help="random seed (bench serve: none, fresh prompts each run)")


def _local_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs for decode")


def _lengths(p: argparse.ArgumentParser, input_len: int, output_len: int) -> None:
    p.add_argument("--input-len", type=int, default=input_len)
    p.add_argument("--output-len", type=int, default=output_len)
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-R), len*(1+R)], R in [0, 1)")
    p.add_argument("--input-range", help="LO,HI: prompt lengths uniform in [LO, HI] (overrides --input-len)")
    p.add_argument("--output-range", help="LO,HI: output lengths uniform in [LO, HI] (overrides --output-len)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; >0: sampling, seed+i per request")


def _engine_args(p: argparse.ArgumentParser) -> None:
    _local_model(p)
    _lengths(p, 128, 128)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--num-warmup-prompts", type=int, default=4)
    p.add_argument("--max-concurrency", type=int, help="closed loop: this many in flight, each finished request "
                   "replaced by the next (as `bench serve --max-concurrency`); default: all prompts at once")
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--kv-cache-memory-gb", type=float, help="KV cache budget on CPU")
    p.add_argument("--baseline", choices=("none", "transformers"), default="none")
    p.add_argument("--hf-api", choices=("auto", "continuous", "padded"), default="auto",
                   help="transformers API: continuous batching (auto falls back to padded generate on failure)")
    p.add_argument("--hf-num-blocks", type=int, help="transformers KV blocks (default: its own sizing on GPU)")
    p.add_argument("--hf-max-batch-tokens", type=int)
    p.add_argument("--hf-block-size", type=int, default=256)
    p.add_argument("--hf-attn-implementation", help="e.g. sdpa, flash_attention_2, paged|sdpa")


def _latency_args(p: argparse.ArgumentParser) -> None:
    _local_model(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed")
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--prefill-repeats", type=int, default=5)
    p.add_argument("--copy-bytes", type=int, help="bytes per tensor of the bandwidth copy (GPU default 2 GiB)")
    p.add_argument("--matmul-n", type=int, help="size of the square matmul (GPU default 8192)")


def _serve_args(p: argparse.ArgumentParser) -> None:
    from cluster.bench.serve_clients import default_client_processes
    from cluster.client_cli import DEFAULT_TARGET

    p.set_defaults(seed=None)  # fresh prompts per run (see run_serve_bench)
    p.add_argument("--target", default=DEFAULT_TARGET, help="router HOST:PORT (grpc), http://HOST:PORT (openai)")
    p.add_argument("--backend", choices=("grpc", "openai"), default="grpc",
                   help="the SDK over gRPC, or the OpenAI-compatible HTTP API (streamed /v1/completions)")
    p.add_argument("--model", help="local copy of the served model, to record its shape (optional; openai: the "
                   "prompts' vocabulary, else token ids < 256)")
    _lengths(p, 1024, 128)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--request-rate", default="inf", help="req/s, or a list for a sweep: 1,2,4,inf")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrivals; 1 = Poisson")
    p.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    p.add_argument("--client-processes", type=int, default=default_client_processes(),
                   help="client processes sharing the requests, each with its own connection (default: min(4, "
                        "cores)); --max-concurrency is split between them")
    p.add_argument("--slo", default="", help="e.g. ttft_ms=500,tpot_ms=50 (also tbt_ms, e2e_ms)")
    p.add_argument("--slo-target", type=float, default=0.9, help="share of requests that must meet the SLOs")
    p.add_argument("--num-warmups", type=int, default=2)
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--api-key", help="the router's API key (default: PDSERVE_API_KEY)")
    p.add_argument("--connect-timeout", type=float, default=60.0)


def _kv_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory (config.json; the weights only with --prefill)")
    src.add_argument("--shape", help="named shape of `pdserve make-model`, e.g. llama-3.1-8b (arch from the shape)")
    p.add_argument("--prompt-len", default="2048", help="tokens per handoff, or a list: 512,2048,8192")
    p.add_argument("--transport", help="nccl, cuda_ipc, gloo, grpc or a list (default: gloo,grpc on CPU, "
                                       "nccl,cuda_ipc,grpc on CUDA)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--gpus", default="0,1", help="CUDA: SENDER,RECEIVER GPU indices (both processes see all GPUs; "
                                                 "0,0: both on one GPU, as 1P+1D on one GPU, not for nccl)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10, help="timed transfers per case")
    p.add_argument("--warmup", type=int, default=2, help="untimed transfers first (at least 1: it is verified)")
    p.add_argument("--case-budget-s", type=float, default=10.0,
                   help="timed seconds per case; slower cases run fewer repeats (at least --min-repeats)")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--send-timeout", type=float, default=300.0, help="seconds per send")
    p.add_argument("--deadline", type=float, default=1200.0, help="seconds for the whole run before giving up")
    p.add_argument("--receiver-busy", action="store_true",
                   help="run a pure-Python busy thread in the receiver (a decode worker's engine loop holds the GIL "
                        "like this): how much the handoff's control path suffers from GIL contention")
    p.add_argument("--switch-interval-ms", type=float,
                   help="sys.setswitchinterval in both processes (default: Python's 5 ms)")
    p.add_argument("--contiguous-ids", action="store_true",
                   help="send consecutive block ids on both sides (a fresh request in an unfragmented cache) "
                        "instead of scattered ones (a fragmented cache, the default)")
    p.add_argument("--churned-ids", action="store_true",
                   help="block ids as the workers' allocators hand them out after serving a while (the `bench "
                        "blocks` replay, in caches of 16 longest prompts)")
    p.add_argument("--prefill", action="store_true",
                   help="also time each prompt's prefill on the sender (--model with weights): alone, with the KV "
                        "streamed layer by layer, and with one send after it")
    p.add_argument("--profile", action="store_true",
                   help="with --prefill: one more prefill alone and one streamed per case under torch.profiler "
                        "(Chrome traces and a per-op comparison in the run folder's profile/)")


def _compare_args(p: argparse.ArgumentParser) -> None:
    from cluster.bench.compare_bench import add_compare_args

    add_compare_args(p)


def _blocks_args(p: argparse.ArgumentParser) -> None:
    from cluster.bench.blocks_bench import add_blocks_args

    add_blocks_args(p)


def _soak_args(p: argparse.ArgumentParser) -> None:
    from cluster.bench.soak_bench import add_soak_args

    add_soak_args(p)


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """Add the `pdserve bench` subcommands to `parser`."""
    sub = parser.add_subparsers(dest="bench", required=True)
    specs = (("engine", "offline throughput of the engine (optionally vs transformers)", _engine_args),
             ("latency", "decode step / prefill latency against measured hardware limits", _latency_args),
             ("serve", "latency, throughput and goodput of a running cluster at request rates", _serve_args),
             ("kv", "KV handoff between two processes per transport vs raw point-to-point", _kv_args),
             ("compare", "disaggregated vs colocated serving on the same GPUs: SLO attainment per rate",
              _compare_args),
             ("blocks", "how fragmented handoff block ids get under churn (the cuda_ipc copy path), no GPU",
              _blocks_args),
             ("soak", "a long mixed load (cancels, deadlines, bad inputs) with a worker kill and a Redis restart on "
              "a cluster it starts: statuses, leaked blocks, RSS", _soak_args))
    for name, help_text, add in specs:
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=parser.formatter_class)
        add(p)
        _common(p)


def run_bench(args: argparse.Namespace) -> int:
    """Run the chosen benchmark."""
    module, func = _RUNNERS[args.bench]
    runner: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), func)
    return runner(args)
