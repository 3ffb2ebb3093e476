"""`pdserve bench serve`: drive a running cluster through the SDK (or, with `--backend openai`, its
OpenAI-compatible HTTP API: `cluster.bench.openai_client`) at one or more request rates.

Requests are random token-id prompts (ids in the served vocabulary) with `ignore_eos=True`, sent at the
times of a gamma arrival process (`metrics.arrival_times`), optionally capped at `--max-concurrency` in
flight, spread over `--client-processes` client processes (`serve_clients`; the cap is split between them).
Each request is timed by the client from the moment it is sent: TTFT at the first token-bearing delta, ITL
between token-bearing deltas, E2E at the end of the stream. Failed requests are recorded with their error
and counted; they never meet an SLO. Each rate writes `rate-<r>.json`; the sweep writes `summary.json`,
`goodput.png` and `latency_cdf.png` into one run folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cluster.bench.metrics import (
    SERVER_KEYS,
    RequestRecord,
    arrival_times,
    inter_token_latencies,
    interval_stats,
    max_rate_meeting,
    parse_slo,
    serve_metrics,
)
from cluster.bench.plots import plot_goodput, plot_latency_cdfs, rate_label
from cluster.bench.report import metadata, run_dir, write_json
from cluster.bench.serve_clients import ClientProcesses, Schedule, make_client, run_schedule, send_one
from cluster.bench.workload import LengthSpec, parse_range, parse_rates, random_prompts


async def run_rate(client: Any, prompts: list[list[int]], out_lens: list[int], rate: float, *,
                   burstiness: float = 1.0, max_concurrency: int | None = None, seed: int = 0,
                   temperature: float = 0.0, timeout: float | None = None, desc: str = "",
                   processes: ClientProcesses | None = None) -> tuple[list[RequestRecord], float, list[float]]:
    """Send every prompt at its arrival time, through `client` or split over `processes`; return the records,
    the duration and the planned gaps."""
    offsets = arrival_times(len(prompts), rate, burstiness, seed)
    seeds = [seed + i if temperature > 0 else None for i in range(len(prompts))]
    schedule = Schedule(prompts, out_lens, offsets, seeds, max_concurrency, temperature, timeout)
    bar = tqdm(total=len(prompts), desc=desc or f"rate {rate_label(rate)}", unit="req")
    try:
        if processes is None:
            t0 = time.perf_counter()
            records = await run_schedule(client, schedule, t0, lambda: bar.update(1))
        else:
            records, t0 = await processes.run(schedule, lambda n: bar.update(n - bar.n))
    finally:
        bar.close()
    duration = max([r.end or r.start for r in records] + [t0]) - t0
    return records, duration, inter_token_latencies(offsets)


def request_rows(records: list[RequestRecord]) -> list[dict[str, Any]]:
    """Per-request results (ms) for the JSON."""
    ms = lambda x: None if x is None else x * 1e3
    return [{"prompt_len": r.prompt_len, "max_tokens": r.max_tokens, "output_tokens": r.num_output_tokens,
             "ttft_ms": ms(r.ttft), "tpot_ms": ms(r.tpot), "tbt_ms": ms(r.tbt), "e2e_ms": ms(r.e2e),
             "num_deltas": len(r.delta_times), "server_ms": r.server_ms, "error": r.error} for r in records]


async def _sweep(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    slo = parse_slo(args.slo)
    rates = parse_rates(args.request_rate)
    lengths = LengthSpec(args.input_len, args.output_len, args.range_ratio, parse_range(args.input_range),
                         parse_range(args.output_range))
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(
            make_client(args.backend, args.target, args.request_timeout, args.api_key))
        await client.wait_until_serving(timeout=args.connect_timeout)
        info = await client.server_info()
        vocab = info.vocab_size  # openai: the served card's, else ids every tokenizer has (--model: the model's)
        meta = metadata("serve", args, None, args.model)
        if meta["model"]:
            model_vocab = meta["model"]["vocab_size"]
            vocab = model_vocab if args.backend == "openai" else min(vocab, model_vocab)
        lengths.check_fits(info.max_model_len)
        pairs = lengths.sample(args.num_prompts, args.seed)
        out_lens = [o for _, o in pairs]
        warm = random_prompts([min(16, pairs[0][0])] * args.num_warmups, vocab, args.seed + 2)
        for p in warm:  # not timed; also proves the cluster answers before the clock starts
            rec = await send_one(client, p, 4, 0.0, None, args.request_timeout)
            if rec.error:
                raise RuntimeError(f"warm-up request failed: {rec.error}")
        processes = None
        if args.client_processes > 1:
            processes = ClientProcesses(args.backend, args.target, args.client_processes, args.request_timeout,
                                        api_key=args.api_key)
            stack.push_async_callback(processes.close)
            await processes.start()
        folder = run_dir(args.out, "serve")  # only once the cluster has answered
        common = {**meta, "server": info.__dict__, "slo": slo,
                  "workload": {"num_prompts": len(pairs), "input_range": lengths.bounds()[0],
                               "output_range": lengths.bounds()[1], "burstiness": args.burstiness,
                               "max_concurrency": args.max_concurrency, "temperature": args.temperature}}
        points, cdfs = [], {}
        for idx, rate in enumerate(rates):  # fresh prompts per rate (same lengths): no prefix-cache hits
            prompts = random_prompts([i for i, _ in pairs], vocab, args.seed + 1 + 1000 * idx)
            records, duration, gaps = await run_rate(
                client, prompts, out_lens, rate, burstiness=args.burstiness, max_concurrency=args.max_concurrency,
                seed=args.seed + 1000 * (idx + 1), temperature=args.temperature, timeout=args.request_timeout,
                processes=processes)
            m = serve_metrics(records, duration, slo)
            write_json(folder / f"rate-{rate_label(rate)}.json",
                       {**common, "request_rate": rate, "arrivals": interval_stats(gaps) if gaps else None,
                        "metrics": m, "requests": request_rows(records)})
            points.append(sweep_point(rate, m))
            cdfs[rate_label(rate)] = {k: [x[k] for x in request_rows(records) if x[k] is not None]
                                      for k in ("ttft_ms", "tpot_ms")}
            _print_rate(rate, m)
    best = max_rate_meeting([(p["rate"], p["slo_attainment"]) for p in points], args.slo_target) if slo else None
    summary = {**common, "seed": args.seed, "rates": points, "slo_target": args.slo_target,
               "max_rate_meeting_slo_target": best}
    write_json(folder / "summary.json", summary)
    plot_goodput(points, folder / "goodput.png", args.slo_target)
    plot_latency_cdfs(cdfs, folder / "latency_cdf.png")
    return summary, folder


def sweep_point(rate: float, m: dict[str, Any]) -> dict[str, Any]:
    """The per-rate line of summary.json: rate, goodput, attainment, throughputs, latency percentiles."""
    keys = ("goodput", "slo_attainment", "request_throughput", "output_token_throughput", "completed", "failed",
            "cached_prompt_tokens", "cached_prompt_fraction")
    point: dict[str, Any] = {"rate": rate, **{k: m[k] for k in keys}}
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "tbt_ms", "e2e_ms"):
        point.update({f"{name}_{q}": m[name][q] for q in ("mean", "p50", "p90", "p99")})
    for name in SERVER_KEYS:
        point.update({f"server_{name}_{q}": m["server_ms"][name][q] for q in ("p50", "p90")})
    return point


def _print_rate(rate: float, m: dict[str, Any]) -> None:
    print(f"rate {rate_label(rate)}: {m['completed']}/{m['num_requests']} ok, {m['failed']} failed, "
          f"{m['request_throughput']:.2f} req/s, {m['output_token_throughput']:.1f} out tok/s | TTFT p50 "
          f"{m['ttft_ms']['p50']:.1f} p99 {m['ttft_ms']['p99']:.1f} ms | TPOT p50 {m['tpot_ms']['p50']:.2f} ms"
          + (f" | goodput {m['goodput']:.2f} req/s ({100 * m['slo_attainment']:.0f}% meet SLOs)" if m["slo"] else "")
          + ("" if m["cached_prompt_tokens"] is None else
             f" | {m['cached_prompt_tokens']} prompt tokens from the prefix cache "
             f"({100 * m['cached_prompt_fraction']:.0f}%)"))
    for error, count in sorted(m["errors"].items(), key=lambda e: -e[1]):
        print(f"  {count} x {error}")


def run_serve_bench(args: argparse.Namespace) -> int:
    """Run the sweep described by `args`; returns 1 if any request failed."""
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if args.client_processes < 1:
        raise ValueError("--client-processes must be >= 1")
    from pdserve import PdserveError

    if args.seed is None:  # fresh prompts, so a second run does not hit the prefix cache the first one filled
        args.seed = random.SystemRandom().randrange(2**31)
        print(f"seed {args.seed} (fresh prompts; --seed {args.seed} draws these again)")
    try:
        summary, folder = asyncio.run(_sweep(args))
    except (PdserveError, RuntimeError) as exc:
        print(f"pdserve bench serve: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    best = summary["max_rate_meeting_slo_target"]
    if not summary["slo"]:
        print("no goodput and no highest rate: they need latency targets to meet (e.g. --slo ttft_ms=500,tpot_ms=50)")
    else:
        print(f"highest rate with >= {100 * args.slo_target:g}% of requests meeting the SLOs: "
              f"{'none' if best is None else rate_label(best)}")
    print(f"wrote {folder}")
    return 1 if any(p["failed"] for p in summary["rates"]) else 0
