"""`pdserve generate` (talk to a running cluster through the SDK) and `pdserve demo` (bring one up, serve
a few requests with streamed output, report TTFT and tokens/s, one chat request over the OpenAI-compatible
HTTP API with the curl line that sends it, shut it down)."""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import time
import urllib.request

DEFAULT_TARGET = "127.0.0.1:50051"  # `pdserve up`'s router with its defaults
DEMO_PROMPTS = ["The history of the river", "In a small town by the sea,", "Once upon a time there was",
                "The best way to learn is"]


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt")
    parser.add_argument("--target", default=DEFAULT_TARGET, help="router address")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds")
    parser.add_argument("--api-key", help="the router's API key (default: PDSERVE_API_KEY)")


def _stream_one(client, prompt: str, max_tokens: int, temperature: float, seed: int | None,
                timeout: float | None) -> tuple[float, int, float]:
    """Print one streamed completion; return (TTFT s, tokens, total s)."""
    start = time.perf_counter()
    ttft = 0.0
    print(f"\n>>> {prompt}", flush=True)
    stream = client.generate_stream(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                    timeout=timeout)
    for delta in stream:
        if not ttft and delta.token_ids:
            ttft = time.perf_counter() - start
        print(delta.text, end="", flush=True)
    result = stream.result()
    total = time.perf_counter() - start
    n = len(result.token_ids)
    print(f"\n[{result.finish_reason}; {n} tokens; TTFT {ttft * 1e3:.1f} ms; {n / total:.1f} tokens/s; "
          f"prefill on {result.prefill_worker}, decode on {result.decode_worker}]", flush=True)
    return ttft, n, total


def run_generate(args: argparse.Namespace) -> int:
    from pdserve import Client
    from pdserve.errors import UnavailableError

    try:
        with Client(args.target, api_key=args.api_key) as client:
            _stream_one(client, args.prompt, args.max_tokens, args.temperature, args.seed, args.timeout)
    except UnavailableError as e:
        raise RuntimeError(f"--target {args.target}: no cluster answers there ({e}); start one with `pdserve up` "
                           "or point --target at its router") from None
    return 0


def _http_chat(url: str, body: dict) -> str:
    """POST a chat completion (stdlib HTTP, as any client would); the reply's text."""
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.load(resp)["choices"][0]["message"]["content"]


def add_demo_args(parser: argparse.ArgumentParser) -> None:
    from cluster.serve import add_up_args

    add_up_args(parser)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--concurrent", type=int, default=16, help="requests in the concurrent burst")


async def _demo(args: argparse.Namespace) -> None:
    from pdserve import AsyncClient, Client

    from cluster.launcher import Cluster
    from cluster.serve import config_from_args

    config = config_from_args(args)
    if args.port is None:
        config = config.replace(port=0)
    if args.http_port is None:
        config = config.replace(http_port=0)
    cluster = await Cluster.start(config)
    if config.model is None:
        print(f"pdserve: the built-in model ({cluster.model_dir}) has random weights: its text is noise; the demo "
              "shows the serving path (--model DIR serves a real checkpoint)", flush=True)
    try:
        with Client(cluster.address) as client:
            for prompt in DEMO_PROMPTS[:2]:
                await asyncio.to_thread(_stream_one, client, prompt, args.max_tokens, 0.0, None, 120.0)
        async with AsyncClient(cluster.address) as aclient:
            print(f"\n>>> {args.concurrent} concurrent requests", flush=True)
            start = time.perf_counter()
            results = await asyncio.gather(*(
                aclient.generate(DEMO_PROMPTS[i % len(DEMO_PROMPTS)], max_tokens=args.max_tokens,
                                 temperature=0.8, seed=i, timeout=300.0) for i in range(args.concurrent)))
            elapsed = time.perf_counter() - start
        tokens = sum(len(r.token_ids) for r in results)
        ttfts = sorted(r.ttft_s for r in results)
        print(f"[{len(results)} requests, {tokens} tokens in {elapsed:.2f} s: {tokens / elapsed:.1f} tokens/s; "
              f"TTFT median {ttfts[len(ttfts) // 2] * 1e3:.1f} ms, max {ttfts[-1] * 1e3:.1f} ms]", flush=True)
        if cluster.http_url:
            body = {"messages": [{"role": "user", "content": DEMO_PROMPTS[0]}], "max_tokens": 24, "temperature": 0}
            print(f"\n>>> OpenAI-compatible HTTP API: curl {cluster.http_url}/v1/chat/completions "
                  f"-H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))}", flush=True)
            print(await asyncio.to_thread(_http_chat, cluster.http_url, body), flush=True)
    finally:
        print("pdserve: shutting down", flush=True)
        await cluster.shutdown()
        print("pdserve: stopped", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    asyncio.run(_demo(args))
    return 0
