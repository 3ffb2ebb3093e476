"""Benchmark math with no I/O: percentiles, per-request latencies, goodput, the arrival process.

Definitions follow `vllm bench serve` and DistServe:
- TTFT: send -> first token-bearing delta. E2E: send -> last delta.
- TPOT of a request: (E2E - TTFT) / (output tokens - 1); undefined for one-token outputs.
- ITL: the gaps between consecutive token-bearing deltas (all requests pooled).
- TBT of a request: the 99th percentile of its own ITLs (time between tokens, the stall a streaming reader
  sees; Sarathi-Serve and Splitwise bound it). Mean TPOT hides a few long stalls; TBT does not.
- goodput: completed requests that meet every SLO, per second of benchmark duration;
  SLO attainment: their share of ALL requests (a failed request never meets an SLO).
- arrivals: gamma-distributed inter-arrival times with shape `burstiness` and mean 1/rate
  (burstiness 1 is a Poisson process; smaller is burstier, coefficient of variation 1/sqrt(burstiness)).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

SLO_KEYS = ("ttft_ms", "tpot_ms", "tbt_ms", "e2e_ms")
# The server's own breakdown of each request (pdserve.Timing, final message): where the TTFT went.
SERVER_KEYS = ("placement_ms", "queue_ms", "prefill_ms", "kv_handoff_ms", "first_decode_step_ms")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median_ci(values: Sequence[float], confidence: float = 0.95, resamples: int = 2000,
              seed: int = 0) -> tuple[float, float]:
    """A bootstrap confidence interval of the median of `values` (seeded, so a report is reproducible)."""
    if not values:
        return math.nan, math.nan
    rng = random.Random(seed)
    n = len(values)
    medians = [percentile(rng.choices(values, k=n), 50) for _ in range(resamples)]
    tail = (1 - confidence) / 2 * 100
    return percentile(medians, tail), percentile(medians, 100 - tail)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """count, mean, std, min, p50, p90, p99, max of `values` (NaN for an empty list, count 0)."""
    n = len(values)
    if n == 0:
        return {"count": 0, **{k: math.nan for k in ("mean", "std", "min", "p50", "p90", "p99", "max")}}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return {"count": n, "mean": mean, "std": std, "min": min(values), "p50": percentile(values, 50),
            "p90": percentile(values, 90), "p99": percentile(values, 99), "max": max(values)}


@dataclass
class RequestRecord:
    """What the client saw of one request; times are seconds on one monotonic clock."""

    prompt_len: int
    max_tokens: int
    start: float
    delta_times: list[float] = field(default_factory=list)  # arrival of each token-bearing delta
    num_output_tokens: int = 0
    end: float | None = None
    error: str | None = None
    server_ms: dict[str, float] | None = None  # SERVER_KEYS from the final message's timing
    cached_prompt_tokens: int | None = None  # prompt tokens served from the prefix cache (final usage), if told

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None and self.num_output_tokens > 0

    @property
    def ttft(self) -> float | None:
        return self.delta_times[0] - self.start if self.delta_times else None

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def tpot(self) -> float | None:
        return tpot(self.e2e, self.ttft, self.num_output_tokens) if self.ok else None

    @property
    def itls(self) -> list[float]:
        return inter_token_latencies(self.delta_times)

    @property
    def tbt(self) -> float | None:
        """p99 of this request's inter-token gaps; None with fewer than two token-bearing deltas."""
        return percentile(self.itls, 99) if self.ok and len(self.delta_times) > 1 else None


def tpot(e2e: float | None, ttft: float | None, num_output_tokens: int) -> float | None:
    """Time per output token after the first: (e2e - ttft) / (n - 1); None when n < 2 or a time is missing."""
    if e2e is None or ttft is None or num_output_tokens < 2:
        return None
    return (e2e - ttft) / (num_output_tokens - 1)


def inter_token_latencies(delta_times: Sequence[float]) -> list[float]:
    """Gaps between consecutive token-bearing deltas."""
    return [b - a for a, b in zip(delta_times, delta_times[1:], strict=False)]


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft_ms=500,tpot_ms=50' (or 'ttft:500 tpot:50') -> {'ttft_ms': 500.0, 'tpot_ms': 50.0}."""
    slo: dict[str, float] = {}
    for part in (text or "").replace(",", " ").split():
        key, sep, value = part.replace(":", "=").partition("=")
        key = key if key.endswith("_ms") else f"{key}_ms"
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"bad SLO {part!r}: expected KEY=MILLISECONDS with KEY in {', '.join(SLO_KEYS)}")
        ms = float(value)
        if not ms > 0:
            raise ValueError(f"SLO {key} must be positive, got {value}")
        slo[key] = ms
    return slo


def meets_slo(rec: RequestRecord, slo: dict[str, float]) -> bool:
    """A request meets the SLOs if it completed and every given bound holds (TPOT and TBT of 1-token outputs
    are 0)."""
    if not rec.ok:
        return False
    got = {"ttft_ms": rec.ttft, "tpot_ms": rec.tpot or 0.0, "tbt_ms": rec.tbt or 0.0, "e2e_ms": rec.e2e}
    return all((got[k] or 0.0) * 1000 <= bound for k, bound in slo.items())


def slo_attainment(records: Sequence[RequestRecord], slo: dict[str, float]) -> float:
    """The share of ALL requests that completed and meet `slo` (NaN for no requests)."""
    return sum(meets_slo(r, slo) for r in records) / len(records) if records else math.nan


def serve_metrics(records: Sequence[RequestRecord], duration_s: float, slo: dict[str, float]) -> dict:
    """Aggregate metrics of one serving run (latencies in ms, throughputs per second of `duration_s`)."""
    done = [r for r in records if r.ok]
    good = [r for r in done if meets_slo(r, slo)]
    out_tokens = sum(r.num_output_tokens for r in done)
    in_tokens = sum(r.prompt_len for r in done)
    ms = lambda xs: [x * 1000 for x in xs if x is not None]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = (r.error or "no tokens").split("\n")[0][:200]
            errors[key] = errors.get(key, 0) + 1
    dur = max(duration_s, 1e-9)
    cached = [r.cached_prompt_tokens for r in done if r.cached_prompt_tokens is not None]
    return {
        "num_requests": len(records), "completed": len(done), "failed": len(records) - len(done),
        "errors": errors, "duration_s": duration_s,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(done) / dur, "output_token_throughput": out_tokens / dur,
        "total_token_throughput": (in_tokens + out_tokens) / dur,
        "ttft_ms": summarize(ms(r.ttft for r in done)), "tpot_ms": summarize(ms(r.tpot for r in done)),
        "itl_ms": summarize(ms(x for r in done for x in r.itls)), "tbt_ms": summarize(ms(r.tbt for r in done)),
        "e2e_ms": summarize(ms(r.e2e for r in done)),
        "server_ms": {k: summarize([r.server_ms[k] for r in done if r.server_ms]) for k in SERVER_KEYS},
        # None when the server does not say (openai backend); else prompt tokens the prefix cache served
        "cached_prompt_tokens": sum(cached) if cached else None,
        "cached_prompt_fraction": sum(cached) / max(1, sum(r.prompt_len for r in done if
                                                           r.cached_prompt_tokens is not None)) if cached else None,
        # No SLO, no goodput: every request would "meet" an empty SLO, whatever its latency.
        "slo": dict(slo), "num_good": len(good) if slo else None,
        "slo_attainment": slo_attainment(records, slo) if slo else None,
        "goodput": len(good) / dur if slo else None,
    }


def gamma_intervals(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """n inter-arrival gaps (seconds) with mean 1/rate, gamma shape `burstiness`; all 0 for rate=inf."""
    if not rate > 0:
        raise ValueError(f"request rate must be positive, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, scale) for _ in range(n)]


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send offsets (seconds from the start): the first request at 0, then the gamma gaps."""
    t, times = 0.0, []
    for gap in [0.0, *gamma_intervals(max(n - 1, 0), rate, burstiness, seed)][:n]:
        t += gap
        times.append(t)
    return times


def interval_stats(intervals: Sequence[float]) -> dict[str, float]:
    """Mean, coefficient of variation and the burstiness it implies (gamma shape = 1 / CV^2)."""
    s = summarize(intervals)
    cv = s["std"] / s["mean"] if s["count"] and s["mean"] > 0 else math.nan
    return {"mean": s["mean"], "cv": cv, "implied_burstiness": 1 / cv**2 if cv and cv > 0 else math.inf}


def max_rate_meeting(points: Iterable[tuple[float, float]], target: float = 0.9) -> float | None:
    """The highest request rate whose SLO attainment is >= target, counting up from the lowest rate and
    stopping at the first rate that misses (so a lucky point past a failure does not count); None if even
    the lowest rate misses. `points` are (rate, attainment in [0, 1]) pairs in any order."""
    best = None
    for rate, attainment in sorted(points):
        if not attainment >= target:
            break
        best = rate
    return best
