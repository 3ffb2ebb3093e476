"""`pdserve bench`: the metric math (no I/O), and each subcommand end to end on CPU with the tiny model."""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
from pathlib import Path

import pytest

from cluster.bench import metrics as m
from cluster.bench.serve_bench import run_rate
from cluster.bench.workload import LengthSpec, parse_range, parse_rates, random_prompts
from cluster.cli import main


# ---- metric math --------------------------------------------------------------------------------------------
def test_percentile_matches_linear_interpolation():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert m.percentile(xs, 0) == 1.0 and m.percentile(xs, 100) == 5.0 and m.percentile(xs, 50) == 3.0
    assert m.percentile(xs, 90) == pytest.approx(4.6)
    assert m.percentile([7.0], 99) == 7.0 and math.isnan(m.percentile([], 50))
    rng = random.Random(1)
    data = [rng.random() for _ in range(101)]
    assert m.percentile(data, 37) == pytest.approx(statistics.quantiles(data, n=100, method="inclusive")[36])
    s = m.summarize([1.0, 2.0, 3.0, 4.0])
    assert (s["count"], s["mean"], s["p50"], s["min"], s["max"]) == (4, 2.5, 2.5, 1.0, 4.0)
    assert m.summarize([])["count"] == 0


def test_median_ci_brackets_the_median_and_narrows_with_more_data():
    assert m.median_ci([3.0] * 10) == (3.0, 3.0)
    assert all(math.isnan(x) for x in m.median_ci([]))
    rng = random.Random(7)
    small = [rng.gauss(3.0, 1.0) for _ in range(10)]
    large = [rng.gauss(3.0, 1.0) for _ in range(400)]
    lo_s, hi_s = m.median_ci(small)
    lo_l, hi_l = m.median_ci(large)
    assert lo_s <= m.percentile(small, 50) <= hi_s and lo_l <= m.percentile(large, 50) <= hi_l
    assert lo_l < 3.0 < hi_l and hi_l - lo_l < (hi_s - lo_s) / 2  # ~1/sqrt(n)
    assert m.median_ci(small) == (lo_s, hi_s)  # seeded: the same data gives the same report


def test_ttft_tpot_itl_e2e_of_one_request():
    rec = m.RequestRecord(prompt_len=10, max_tokens=4, start=100.0, delta_times=[100.5, 100.6, 100.8],
                          num_output_tokens=4, end=100.9)  # the last delta carried two tokens
    assert rec.ok and rec.ttft == pytest.approx(0.5) and rec.e2e == pytest.approx(0.9)
    assert rec.tpot == pytest.approx(0.4 / 3)  # (e2e - ttft) / (n - 1)
    assert rec.itls == pytest.approx([0.1, 0.2])
    assert rec.tbt == pytest.approx(0.1 + 0.99 * 0.1)  # p99 of its own gaps
    assert m.tpot(1.0, 0.5, 1) is None
    failed = m.RequestRecord(prompt_len=3, max_tokens=4, start=0.0, error="UnavailableError: gone")
    assert not failed.ok and failed.ttft is None and failed.tpot is None and failed.tbt is None


def test_tbt_slo_catches_a_stall_that_mean_tpot_hides():
    # 5 ms per token, but one 80 ms stall (a prefill chunk in the same step): mean TPOT 8.8 ms, TBT ~ 80 ms
    gaps = [0.005] * 19 + [0.08]
    times = [0.1]
    for g in gaps:
        times.append(times[-1] + g)
    rec = m.RequestRecord(prompt_len=8, max_tokens=21, start=0.0, delta_times=times, num_output_tokens=21,
                          end=times[-1])
    assert rec.tpot == pytest.approx(sum(gaps) / 20)
    assert m.meets_slo(rec, {"ttft_ms": 500, "tpot_ms": 15})
    assert not m.meets_slo(rec, {"ttft_ms": 500, "tbt_ms": 15})
    assert m.parse_slo("tbt=15") == {"tbt_ms": 15.0}
    assert m.serve_metrics([rec], 1.0, {"tbt_ms": 100})["tbt_ms"]["max"] == pytest.approx(rec.tbt * 1000)


def test_goodput_and_attainment_count_failures():
    def req(ttft: float, tpot: float, n: int = 11) -> m.RequestRecord:
        times = [ttft + i * tpot for i in range(n)]
        return m.RequestRecord(prompt_len=8, max_tokens=n, start=0.0, delta_times=times, num_output_tokens=n,
                               end=times[-1])

    records = [req(0.1, 0.01), req(0.1, 0.01), req(0.9, 0.01), req(0.1, 0.2),
               m.RequestRecord(prompt_len=8, max_tokens=11, start=0.0, error="DeadlineExceededError: late")]
    slo = m.parse_slo("ttft_ms=500,tpot_ms=50")
    assert slo == {"ttft_ms": 500.0, "tpot_ms": 50.0} == m.parse_slo("ttft:500 tpot:50")
    out = m.serve_metrics(records, duration_s=2.0, slo=slo)
    assert (out["num_requests"], out["completed"], out["failed"], out["num_good"]) == (5, 4, 1, 2)
    assert out["goodput"] == pytest.approx(1.0)  # 2 good requests / 2 s
    assert out["slo_attainment"] == pytest.approx(0.4)  # of all 5, the failure included
    assert out["request_throughput"] == pytest.approx(2.0)
    assert out["output_token_throughput"] == pytest.approx(44 / 2)
    assert out["errors"] == {"DeadlineExceededError: late": 1}
    assert out["tpot_ms"]["p50"] == pytest.approx(10.0) and out["ttft_ms"]["max"] == pytest.approx(900.0)
    assert m.serve_metrics(records, 2.0, {})["num_good"] is None  # no SLO: no claim about good requests
    for bad in ("ttft=abc", "foo_ms=3", "ttft_ms=-1", "ttft_ms"):
        with pytest.raises(ValueError):
            m.parse_slo(bad)


@pytest.mark.parametrize("rate,burstiness", [(4.0, 1.0), (10.0, 0.25), (2.0, 4.0)])
def test_gamma_arrivals_have_the_rate_and_burstiness(rate, burstiness):
    gaps = m.gamma_intervals(20000, rate, burstiness, seed=3)
    stats = m.interval_stats(gaps)
    assert stats["mean"] == pytest.approx(1 / rate, rel=0.05)
    assert stats["cv"] == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)  # Poisson: CV 1
    assert stats["implied_burstiness"] == pytest.approx(burstiness, rel=0.12)
    assert m.gamma_intervals(5, rate, burstiness, seed=3) == gaps[:5]  # reproducible
    times = m.arrival_times(20000, rate, burstiness, seed=3)
    assert times[0] == 0.0 and times[-1] == pytest.approx(sum(gaps[:-1]))
    assert m.arrival_times(3, math.inf) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        m.gamma_intervals(3, 0.0)


def test_max_rate_meeting_the_slo_target():
    sweep = [(4.0, 0.85), (1.0, 1.0), (2.0, 0.95), (8.0, 0.92), (math.inf, 0.1)]
    assert m.max_rate_meeting(sweep, 0.9) == 2.0  # 8 req/s is past the first miss: not counted
    assert m.max_rate_meeting(sweep, 0.8) == 8.0
    assert m.max_rate_meeting([(1.0, 0.5)], 0.9) is None
    assert m.max_rate_meeting([(1.0, 1.0), (math.inf, 0.95)]) == math.inf


def test_workload_lengths_prompts_and_parsing():
    spec = LengthSpec(input_len=100, output_len=10, range_ratio=0.5)
    assert spec.bounds() == ((50, 150), (5, 15))
    pairs = spec.sample(500, seed=1)
    assert all(50 <= i <= 150 and 5 <= o <= 15 for i, o in pairs) and pairs == spec.sample(500, seed=1)
    assert len({i for i, _ in pairs}) > 50 and len({o for _, o in pairs}) == 11
    fixed = LengthSpec(input_len=7, output_len=3, input_range=(2, 4))
    assert {p for p in fixed.sample(50, 0)} <= {(2, 3), (3, 3), (4, 3)}
    with pytest.raises(ValueError):
        LengthSpec(input_len=3000, output_len=2000).check_fits(4096)
    prompts = random_prompts([5, 9], vocab_size=50, seed=0, avoid={0, 49})
    assert [len(p) for p in prompts] == [5, 9] and all(0 < t < 49 for p in prompts for t in p)
    assert parse_range("1024,4096") == (1024, 4096) and parse_range(None) is None
    assert parse_rates("1,2.5,inf") == [1.0, 2.5, math.inf]
    with pytest.raises(ValueError):
        parse_rates("0,1")


class _FlakyClient:
    """Stands in for AsyncClient at the SDK boundary: every third request fails mid-stream."""

    def generate_stream(self, prompt, *, max_tokens, **_):
        fail = prompt[0] % 3 == 0
        return _Stream(max_tokens, fail)


class _Stream:
    def __init__(self, n: int, fail: bool) -> None:
        self.n, self.fail = n, fail

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    async def __aiter__(self):
        from pdserve import GenerateDelta, UnavailableError

        for i in range(self.n):
            await asyncio.sleep(0.001)
            if self.fail and i == 1:
                raise UnavailableError("decode worker died")
            yield GenerateDelta(request_id="r", token_ids=[1])
        yield GenerateDelta(request_id="r", finish_reason="length")


def test_failed_requests_are_recorded_not_dropped():
    prompts = [[i, 1, 2] for i in range(9)]
    records, duration, gaps = asyncio.run(run_rate(_FlakyClient(), prompts, [4] * 9, 200.0, max_concurrency=3))
    assert len(records) == 9 and duration > 0 and len(gaps) == 8
    assert sum(not r.ok for r in records) == 3 and all("decode worker died" in r.error for r in records if not r.ok)
    out = m.serve_metrics(records, duration, {"ttft_ms": 10_000})
    assert out["failed"] == 3 and out["completed"] == 6 and out["slo_attainment"] == pytest.approx(6 / 9)


def test_schedule_splits_requests_and_the_concurrency_cap():
    from cluster.bench.serve_clients import Schedule

    sched = Schedule([[i] for i in range(7)], list(range(7)), [0.1 * i for i in range(7)], [None] * 7,
                     max_concurrency=5)
    shares = sched.split(3)
    assert [idx for idx, _ in shares] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [s.max_concurrency for _, s in shares] == [2, 2, 1]
    assert shares[1][1].prompts == [[1], [4]] and shares[1][1].offsets == [0.1, 0.4]
    assert [len(idx) for idx, _ in sched.split(10)] == [2, 2, 1, 1, 1]  # no more shares than the cap of 5
    assert [s.max_concurrency for _, s in Schedule([[1]] * 4, [1] * 4, [0.0] * 4, [None] * 4).split(8)] == [None] * 4


def test_client_process_that_cannot_connect_fails_the_run():
    from cluster.bench.serve_clients import ClientProcesses

    async def go():
        procs = ClientProcesses("grpc", "127.0.0.1:1", 1, timeout=2.0)
        try:
            await procs.start()
        finally:
            await procs.close()

    with pytest.raises(RuntimeError, match="bench client process 0: UnavailableError"):
        asyncio.run(go())


# ---- the subcommands end to end -----------------------------------------------------------------------------
def _one_json(folder: Path, pattern: str) -> dict:
    (path,) = folder.glob(pattern)
    return json.loads(path.read_text())


def _check_metadata(data: dict, kind: str) -> None:
    assert data["benchmark"] == kind and data["timestamp"] and data["command_line"]
    assert data["versions"]["torch"] and data["versions"]["transformers"]
    assert data["model"]["architecture"] == "LlamaForCausalLM" and data["model"]["num_params"] > 0
    assert data["git"] is None or len(data["git"]["commit"]) == 40


def test_bench_engine_against_transformers(tiny_llama, tmp_path, monkeypatch):
    import gc

    from cluster.bench import engine_bench
    from cluster.engine import LLMEngine

    engines_alive = []

    def run_transformers(*args, **kwargs):  # our engine must be gone before transformers loads its copy
        gc.collect()
        engines_alive.append(sum(type(o) is LLMEngine for o in gc.get_objects()))
        return real(*args, **kwargs)

    real = engine_bench.run_transformers
    monkeypatch.setattr(engine_bench, "run_transformers", run_transformers)
    rc = main(["bench", "engine", "--model", str(tiny_llama), "--num-prompts", "8", "--input-len", "12",
               "--output-len", "6", "--baseline", "transformers", "--num-kv-blocks", "64", "--out", str(tmp_path)])
    assert rc == 0 and engines_alive == [0]
    data = _one_json(tmp_path, "engine-*/result.json")
    _check_metadata(data, "engine")
    assert data["device_name"] and data["dtype"] == "float32" and data["problems"] == []
    ours, base = data["pdserve"], data["baseline"]
    assert ours["output_tokens"] == base["output_tokens"] == 48 and ours["input_tokens"] == 96
    assert base["api"] == "generate_batch" and base["fallback_reason"] is None
    for r in (ours, base):
        assert r["wall_s"] > 0 and r["output_tokens_per_s"] == pytest.approx(48 / r["wall_s"])
    assert data["ratio_vs_baseline"]["output_tokens_per_s"] == pytest.approx(
        ours["output_tokens_per_s"] / base["output_tokens_per_s"])


def test_bench_latency_reports_ratios_to_measured_limits(tiny_llama, tmp_path):
    rc = main(["bench", "latency", "--model", str(tiny_llama), "--batch-size", "3", "--context-len", "20",
               "--steps", "5", "--warmup-steps", "1", "--prefill-len", "40", "--prefill-repeats", "2",
               "--copy-bytes", str(8 * 2**20), "--matmul-n", "256", "--out", str(tmp_path)])
    assert rc == 0
    data = _one_json(tmp_path, "latency-*/result.json")
    _check_metadata(data, "latency")
    dec, pre, hw, roof = data["decode"], data["prefill"], data["hardware"], data["roofline"]
    assert dec["step_ms"]["count"] == 5 and dec["all_steps_full_batch"] and dec["batch_sizes"] == [3]
    assert 0 < dec["median_ms"] <= dec["p90_ms"] and len(pre["times_ms"]) == 2
    assert hw["bandwidth_bytes_per_s"] > 0 and hw["matmul_flops_per_s"] > 0 and hw["matmul_n"] == 256
    spec = data["model"]
    assert roof["kv_bytes_read"] == 3 * 20 * spec["num_layers"] * 2 * spec["num_kv_heads"] * spec["head_dim"] * 4
    assert roof["prefill_flops"] == 2 * spec["num_params"] * 40
    assert roof["decode_step_over_floor"] == pytest.approx(dec["median_ms"] / roof["decode_floor_ms"])
    assert roof["prefill_fraction_of_matmul"] > 0


@pytest.mark.slow
def test_bench_serve_sweep_against_a_local_cluster(ray_session, tiny_llama, tmp_path):
    from cluster.cluster_config import ClusterConfig, EngineOptions
    from tests.cluster_harness import ClusterHarness

    harness = ClusterHarness(ClusterConfig(model=str(tiny_llama), prefill=1, decode=1, transport="grpc", port=0,
                                           http_port=0, cluster_name="bench-serve",
                                           engine=EngineOptions(num_kv_blocks=96, max_num_seqs=16)))
    try:
        rc = main(["bench", "serve", "--target", harness.address, "--model", str(tiny_llama),
                   "--num-prompts", "12", "--request-rate", "20,inf", "--input-range", "8,24",
                   "--output-range", "4,10", "--slo", "ttft_ms=20000,tpot_ms=5000", "--max-concurrency", "8",
                   "--num-warmups", "1", "--client-processes", "2", "--out", str(tmp_path), "--seed", "0"])
        # The same prompts again (--seed 0), no --slo: no goodput claim; the prefix cache's share is counted.
        again = tmp_path / "again"
        rc_again = main(["bench", "serve", "--target", harness.address, "--model", str(tiny_llama),
                         "--num-prompts", "12", "--request-rate", "20,inf", "--input-range", "8,24",
                         "--output-range", "4,10", "--max-concurrency", "8", "--num-warmups", "1",
                         "--out", str(again), "--seed", "0"])
    finally:
        harness.close()
    assert rc == 0 and rc_again == 0
    (rerun,) = again.glob("serve-*")
    resummary = json.loads((rerun / "summary.json").read_text())
    assert resummary["max_rate_meeting_slo_target"] is None
    assert all(p["goodput"] is None and p["slo_attainment"] is None for p in resummary["rates"])
    assert all(p["cached_prompt_tokens"] > 0 for p in resummary["rates"]), resummary["rates"]
    (run,) = tmp_path.glob("serve-*")
    assert {p.name for p in run.iterdir()} == {"rate-20.json", "rate-inf.json", "summary.json", "goodput.png",
                                                "latency_cdf.png"}
    assert all((run / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in ("goodput.png", "latency_cdf.png"))
    summary = json.loads((run / "summary.json").read_text())
    _check_metadata(summary, "serve")
    assert summary["device_name"] and summary["device_note"]
    assert summary["server"]["vocab_size"] > 0 and [p["rate"] for p in summary["rates"]] == [20.0, "inf"]
    assert summary["max_rate_meeting_slo_target"] == "inf"  # generous SLOs: every request meets them
    assert summary["options"]["client_processes"] == 2
    planned = LengthSpec(input_range=(8, 24), output_range=(4, 10)).sample(12, 0)
    for name in ("rate-20.json", "rate-inf.json"):
        data = json.loads((run / name).read_text())
        met = data["metrics"]
        assert (met["num_requests"], met["completed"], met["failed"]) == (12, 12, 0)
        assert met["slo_attainment"] == 1.0 and met["goodput"] == pytest.approx(met["request_throughput"])
        assert 0 < met["ttft_ms"]["p50"] <= met["ttft_ms"]["p99"] <= met["e2e_ms"]["max"]
        assert met["tpot_ms"]["count"] == 12 and met["itl_ms"]["count"] > 0
        rows = data["requests"]
        assert all(r["error"] is None and r["output_tokens"] == r["max_tokens"] for r in rows)
        assert [(r["prompt_len"], r["max_tokens"]) for r in rows] == planned  # merged back in schedule order
        assert met["total_output_tokens"] == sum(r["output_tokens"] for r in rows)


def test_bench_engine_closed_loop(tiny_llama, tmp_path):
    """--max-concurrency: never more than N in flight, every request whole, metrics as `bench serve` has them."""
    rc = main(["bench", "engine", "--model", str(tiny_llama), "--num-prompts", "10", "--input-len", "12",
               "--output-len", "6", "--max-concurrency", "3", "--out", str(tmp_path)])
    assert rc == 0
    m = _one_json(tmp_path, "engine-*/result.json")["closed_loop"]
    assert (m["max_concurrency"], m["completed"], m["failed"], m["total_output_tokens"]) == (3, 10, 0, 60)
    assert 0 < m["ttft_ms"]["p50"] <= m["e2e_ms"]["p50"] and m["tpot_ms"]["p50"] > 0


def test_closed_loop_keeps_concurrency(tiny_llama):
    from cluster.bench.engine_closed_loop import run_closed_loop
    from cluster.engine import LLM, SamplingParams

    engine = LLM(str(tiny_llama), device="cpu").engine
    prompts = [[5 + i, 6, 7] for i in range(7)]
    records, wall = run_closed_loop(engine, prompts, [SamplingParams(max_tokens=4, ignore_eos=True)] * 7, 2)
    spans = sorted((r.start, r.end) for r in records)
    assert all(r.num_output_tokens == 4 and r.end is not None for r in records) and wall > 0
    for t, _ in spans:  # at any request's start, at most 2 are in flight (itself included)
        assert sum(1 for s, e in spans if s <= t < e) <= 2


def test_no_slo_means_no_goodput_and_cached_tokens_are_counted():
    rec = m.RequestRecord(prompt_len=32, max_tokens=2, start=0.0, delta_times=[0.1, 0.2], num_output_tokens=2,
                          end=0.2, cached_prompt_tokens=16)
    out = m.serve_metrics([rec], 1.0, {})
    assert out["goodput"] is None and out["slo_attainment"] is None and out["num_good"] is None
    assert out["cached_prompt_tokens"] == 16 and out["cached_prompt_fraction"] == pytest.approx(0.5)
    assert m.serve_metrics([rec], 1.0, {"ttft_ms": 1000})["goodput"] == pytest.approx(1.0)


@pytest.mark.parametrize("with_slo", [True, False])
def test_goodput_plot_axes_start_at_zero_with_the_legend_off_the_axes(with_slo):
    from cluster.bench.plots import goodput_figure, pyplot

    points = [{"rate": r, "request_throughput": 1.96 + r / 100, "goodput": 2.0 if with_slo else None,
               "slo_attainment": 0.95 if with_slo else None} for r in (1.0, 2.0, float("inf"))]
    fig = goodput_figure(points)
    try:
        assert all(ax.get_ylim()[0] == 0 for ax in fig.axes)
        assert all(ax.get_legend() is None for ax in fig.axes) and fig.legends  # the figure's, below the axes
        assert len(fig.axes) == (2 if with_slo else 1)
    finally:
        pyplot().close(fig)
