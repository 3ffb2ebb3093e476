"""`pdserve bench compare`: disaggregated against colocated serving on the same model and GPUs, one run.

For each mode it brings up a cluster in this process (`Cluster.start`), measures the unloaded latency of
single requests, then drives it at each request rate with the same prompts. The SLOs are relative to the
unloaded values measured in this run (TTFT <= k_ttft x and TPOT <= k_tpot x the best mode's unloaded median),
and a mode's goodput is the highest rate at which >= `--slo-target` of its requests meet both.

A second view bounds each request's TBT (p99 of its own inter-token gaps, `metrics.RequestRecord.tbt`) by the
same k_tpot x unloaded TPOT instead of its mean TPOT: the stall a streaming reader sees, which mean TPOT averages
away. A mode may carry a per-step token budget, `colocated/1024`: chunked prefill in smaller pieces, the
colocated engine's own lever on stalls (it costs prefill efficiency).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import time
from typing import Any

from cluster.bench.kv_trace_report import format_summary, load_trace, phase_summary
from cluster.bench.metrics import max_rate_meeting, serve_metrics, slo_attainment
from cluster.bench.plots import rate_label
from cluster.bench.report import metadata, run_dir, write_json
from cluster.bench.serve_bench import request_rows, run_rate, send_one, sweep_point
from cluster.bench.workload import LengthSpec, parse_range, parse_rates, random_prompts
from cluster.cluster_config import ClusterConfig, EngineOptions
from cluster.kv_trace import ENV as KV_TRACE_ENV


def add_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--prefill", type=int, default=1, help="disaggregated: prefill workers")
    p.add_argument("--decode", type=int, default=1, help="disaggregated: decode workers")
    p.add_argument("--transport", default="auto")
    p.add_argument("--modes", default="disaggregated,colocated",
                   help="comma list of disaggregated, colocated; MODE/N gives that mode a per-step token budget "
                        "of N instead of --max-num-batched-tokens (e.g. colocated/1024)")
    p.add_argument("--num-prompts", type=int, default=100, help="requests per rate (see --seconds-per-rate)")
    p.add_argument("--seconds-per-rate", type=float,
                   help="instead of --num-prompts, send ceil(rate x S) requests at each finite rate: every rate "
                        "then loads the cluster for about S seconds (a fixed count is a short burst at high rates)")
    p.add_argument("--request-rate", default="1,2,4,8")
    p.add_argument("--input-range", default="1024,4096")
    p.add_argument("--output-range", default="64,256")
    p.add_argument("--ttft-factor", type=float, default=5.0)
    p.add_argument("--tpot-factor", type=float, default=3.0)
    p.add_argument("--slo-target", type=float, default=0.9)
    p.add_argument("--unloaded-requests", type=int, default=4)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--kv-trace", action="store_true",
                   help="trace every KV handoff (PDSERVE_KV_TRACE) and report its phases per rate")


def requests_per_rate(rates: list[float], num_prompts: int, seconds: float | None) -> list[int]:
    """How many requests each rate sends: `num_prompts`, or ceil(rate x seconds) with --seconds-per-rate
    (an infinite rate, which has no duration, keeps `num_prompts`)."""
    if seconds is None:
        return [num_prompts] * len(rates)
    if not seconds > 0:
        raise ValueError(f"--seconds-per-rate must be positive, got {seconds}")
    return [num_prompts if math.isinf(r) else max(1, math.ceil(r * seconds)) for r in rates]


def mode_spec(mode: str, default_budget: int) -> tuple[str, int]:
    """'colocated/1024' -> ('colocated', 1024); a bare mode takes `default_budget`."""
    base, sep, budget = mode.partition("/")
    if base not in ("disaggregated", "colocated"):
        raise ValueError(f"unknown mode {mode!r}: expected disaggregated or colocated, optionally /TOKENS")
    if not sep:
        return base, default_budget
    if not budget.isdigit() or int(budget) < 16:
        raise ValueError(f"bad token budget in {mode!r}: expected an integer >= 16")
    return base, int(budget)


Workload = tuple[list[list[int]], list[int]]  # one rate's prompts and output lengths


async def _run_mode(args: argparse.Namespace, mode: str, workloads: list[Workload], unloaded: list[list[int]],
                    warmup: list[list[int]], rates: list[float]) -> dict[str, Any]:
    from pdserve import AsyncClient

    from cluster.launcher import Cluster

    base, budget = mode_spec(mode, args.max_num_batched_tokens)
    engine = EngineOptions(max_num_batched_tokens=budget, enable_chunked_prefill=base == "colocated")
    config = ClusterConfig(model=args.model, device=args.device, mode=base, prefill=args.prefill,
                           decode=args.decode, transport=args.transport, port=0,
                           cluster_name=f"compare-{base}-{budget}",
                           engine=engine, cpus_per_worker=2.0)
    cluster = await Cluster.start(config, progress=False)
    try:
        async with AsyncClient(cluster.address, timeout=args.request_timeout) as client:
            # Warm-up, not timed: prompts spanning the workload's lengths, alone and concurrently, so kernel
            # compilation and first-use library choices happen before the clock starts.
            for p in warmup:
                await send_one(client, p, 8, 0.0, None, args.request_timeout)
            await asyncio.gather(*(send_one(client, p, 8, 0.0, None, args.request_timeout) for p in warmup))
            singles = [await send_one(client, p, 64, 0.0, None, args.request_timeout) for p in unloaded]
            runs = []
            for rate, (prompts, out_lens) in zip(rates, workloads, strict=True):
                start = time.monotonic()
                records, duration, _ = await run_rate(client, prompts, out_lens, rate, seed=args.seed,
                                                      desc=f"{mode} rate {rate_label(rate)}")
                runs.append((rate, records, duration, (start, time.monotonic())))
    finally:
        await cluster.shutdown()
    bad = [r.error for r in singles if r.error]
    if bad:
        raise RuntimeError(f"{mode}: unloaded requests failed: {bad[:2]}")
    return {"unloaded_ttft_s": statistics.median(r.ttft for r in singles),
            "unloaded_tpot_s": statistics.median(r.tpot for r in singles), "runs": runs}


async def _compare(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.engine.models.loader import read_model_spec

    modes = args.modes.split(",")
    for mode in modes:  # bad arguments fail before any cluster starts
        mode_spec(mode, args.max_num_batched_tokens)
    if len(set(modes)) != len(modes):
        raise ValueError(f"--modes lists a mode twice: {args.modes}")
    spec = read_model_spec(args.model)
    rates = parse_rates(args.request_rate)
    lengths = LengthSpec(input_range=parse_range(args.input_range), output_range=parse_range(args.output_range))
    vocab = spec.vocab_size
    workloads: list[Workload] = []
    for k, n in enumerate(requests_per_rate(rates, args.num_prompts, args.seconds_per_rate)):
        pairs = lengths.sample(n, args.seed)  # one seed: every rate draws the same lengths, in the same order
        workloads.append((random_prompts([i for i, _ in pairs], vocab, args.seed + 1 + 1000 * k),
                          [o for _, o in pairs]))
    pairs = lengths.sample(args.num_prompts, args.seed)
    mid = sorted(i for i, _ in pairs)[len(pairs) // 2]
    unloaded = random_prompts([mid] * args.unloaded_requests, vocab, args.seed + 7)
    (ilo, ihi), _ = lengths.bounds()
    warmup = random_prompts([ilo, (ilo + ihi) // 2, ihi, mid, ilo + 1, ihi - 1], vocab, args.seed + 9)
    results = {}
    for mode in modes:
        results[mode] = await _run_mode(args, mode, workloads, unloaded, warmup, rates)
    base_ttft = min(r["unloaded_ttft_s"] for r in results.values())
    base_tpot = min(r["unloaded_tpot_s"] for r in results.values())
    slo = {"ttft_ms": args.ttft_factor * base_ttft * 1e3, "tpot_ms": args.tpot_factor * base_tpot * 1e3}
    slo_tbt = {"ttft_ms": slo["ttft_ms"], "tbt_ms": slo["tpot_ms"]}
    report: dict[str, Any] = {"slo": slo, "slo_tbt": slo_tbt, "modes": {}}
    trace = load_trace(os.environ[KV_TRACE_ENV]) if args.kv_trace else []
    for mode, r in results.items():
        points = []
        for rate, records, duration, window in r["runs"]:
            points.append(sweep_point(rate, serve_metrics(records, duration, slo)))
            points[-1]["tbt_slo_attainment"] = slo_attainment(records, slo_tbt)
            if trace:
                points[-1]["kv_trace"] = phase_summary(trace, window)
        report["modes"][mode] = {
            "unloaded_ttft_ms": r["unloaded_ttft_s"] * 1e3, "unloaded_tpot_ms": r["unloaded_tpot_s"] * 1e3,
            "points": points, "requests": {rate_label(rate): request_rows(rec) for rate, rec, _, _ in r["runs"]},
            "goodput_rate": max_rate_meeting([(p["rate"], p["slo_attainment"]) for p in points], args.slo_target),
            "goodput_rate_tbt": max_rate_meeting([(p["rate"], p["tbt_slo_attainment"]) for p in points],
                                                 args.slo_target)}
    return report


def _plot(report: dict[str, Any], path: Any, target: float) -> None:
    from cluster.bench.plots import pyplot

    plt = pyplot()

    slo, tbt = report["slo"], report["slo_tbt"]
    views = (("slo_attainment", f"TTFT<={slo['ttft_ms']:.0f} ms, mean TPOT<={slo['tpot_ms']:.1f} ms"),
             ("tbt_slo_attainment", f"TTFT<={tbt['ttft_ms']:.0f} ms, p99 TBT<={tbt['tbt_ms']:.1f} ms"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (key, title) in zip(axes, views, strict=True):
        for mode, data in report["modes"].items():
            ax.plot([p["rate"] for p in data["points"]], [100 * p[key] for p in data["points"]], marker="o",
                    label=mode)
        ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(title, fontsize=10)
        ax.legend()
    axes[0].set_ylabel("requests meeting both SLOs (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_compare_bench(args: argparse.Namespace) -> int:
    folder = run_dir(args.out, "compare")
    if args.kv_trace:  # the workers inherit it (Cluster passes it on)
        os.environ[KV_TRACE_ENV] = str((folder / "kv-trace").resolve())
    report = asyncio.run(_compare(args))
    write_json(folder / "result.json", {**metadata("compare", args, args.device, args.model), **report})
    _plot(report, folder / "slo_attainment.png", args.slo_target)
    for mode, data in report["modes"].items():
        print(f"{mode}: unloaded TTFT {data['unloaded_ttft_ms']:.1f} ms, TPOT {data['unloaded_tpot_ms']:.2f} ms; "
              f"goodput rate {data['goodput_rate']} (with the p99 TBT bound instead: {data['goodput_rate_tbt']})")
        for p in data["points"]:
            print(f"  rate {rate_label(p['rate'])}: {100 * p['slo_attainment']:.0f}% meet SLOs, TTFT p90 "
                  f"{p['ttft_ms_p90']:.0f} ms (p90 of router {p['server_placement_ms_p90']:.0f}, queue "
                  f"{p['server_queue_ms_p90']:.0f}, prefill "
                  f"{p['server_prefill_ms_p90']:.0f}, handoff {p['server_kv_handoff_ms_p90']:.1f}), TPOT p90 "
                  f"{p['tpot_ms_p90']:.1f} ms, TBT p90 {p['tbt_ms_p90']:.1f} ms ({100 * p['tbt_slo_attainment']:.0f}% "
                  f"meet TTFT+TBT), {p['failed']} failed")
            if p.get("kv_trace", {}).get("handoffs"):
                print(f"    handoff phases: {format_summary(p['kv_trace'])}")
    print(f"wrote {folder}")
    return 0


