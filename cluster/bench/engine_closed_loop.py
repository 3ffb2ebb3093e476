"""`bench engine --max-concurrency N`: the engine alone under `bench serve --max-concurrency N`'s closed loop.

N requests are in flight from the start, and each finished one is replaced at once by the next, in this process
with no server in between. Every request's times are recorded as a `bench serve` client records them (start,
each output's arrival after its step, end), so `serve_metrics` gives TTFT / TPOT / ITL on the same
definitions: the ratio of `bench serve` to this, on the same workload and GPU, is the serving path's cost
(a decode step alone, `bench latency`, leaves out the prefill steps a closed loop interleaves).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from cluster.bench.metrics import RequestRecord, serve_metrics
from cluster.engine import LLMEngine, SamplingParams


def run_closed_loop(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams],
                    concurrency: int) -> tuple[list[RequestRecord], float]:
    """Run every prompt with at most `concurrency` in flight; records in prompt order and the wall time."""
    if concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {concurrency}")
    records = [RequestRecord(prompt_len=len(p), max_tokens=sp.max_tokens, start=0.0)
               for p, sp in zip(prompts, params, strict=True)]
    pending = deque(range(len(prompts)))
    running: dict[str, int] = {}

    def admit(now: float) -> None:
        while pending and len(running) < concurrency:
            i = pending.popleft()
            rid = f"closed-{i}"
            engine.add_request(rid, prompts[i], params[i])
            records[i].start = now
            running[rid] = i

    t0 = time.perf_counter()
    admit(t0)
    while running:
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            rec = records[running[out.request_id]]
            if out.new_token_ids:
                rec.delta_times.append(now)
                rec.num_output_tokens += len(out.new_token_ids)
            if out.finished:
                rec.end = now
                del running[out.request_id]
        admit(now)
    return records, time.perf_counter() - t0


def closed_loop_result(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams],
                       concurrency: int) -> dict[str, Any]:
    """`serve_metrics` of a closed-loop run, plus the concurrency."""
    records, wall = run_closed_loop(engine, prompts, params, concurrency)
    return {"max_concurrency": concurrency, **serve_metrics(records, wall, {})}
