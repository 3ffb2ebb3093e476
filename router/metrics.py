"""Prometheus metrics of the router (vLLM's names under `pdserve:`), for `GET /metrics`.

Request series are observed here, on the router, from each request's messages: TTFT, e2e, queue, prefill
and KV-handoff times from the Final's timing, token counts from its usage, inter-token latency from the
time between deltas. Worker series (`role`, `worker` labels) are read from the registry's live load at
scrape time, so the router's one endpoint shows the whole cluster.

With `PROMETHEUS_MULTIPROC_DIR` set (several router processes), prometheus_client keeps each process's
values in files there and a scrape of any process sums them all.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterable

import grpc
from pdserve.v1 import generate_pb2 as pb
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cluster import env
from cluster.registry import WorkerInfo, WorkerLoad
from router.errors import RouterError

MULTIPROC_ENV = env.PROMETHEUS_MULTIPROC_DIR
# vLLM's buckets, with a few smaller ones: a GPU decode step is milliseconds.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _Families(Collector):
    """Metric families computed before the scrape (the worker gauges, or this process's own registry)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


class RouterMetrics:
    """The router's series for one served model, and the exposition of a scrape."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.multiproc_dir = os.environ.get(MULTIPROC_ENV) or None  # prometheus_client reads it at import too
        self.registry = CollectorRegistry()
        reg, labels = self.registry, ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"pdserve:{name}", doc, labels, buckets=buckets, registry=reg)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"pdserve:{name}", doc, [*labels, *extra], registry=reg)

        m = model_name
        self.ttft = histogram("time_to_first_token_seconds", "Router receipt to first token", LATENCY_BUCKETS).labels(m)
        self.itl = histogram("inter_token_latency_seconds", "Time between tokens at the router", ITL_BUCKETS).labels(m)
        self.e2e = histogram("e2e_request_latency_seconds", "Router receipt to final message", REQUEST_BUCKETS
                             ).labels(m)
        self.queue = histogram("request_queue_time_seconds", "Validation, placement, reservation and prefill queue",
                               REQUEST_BUCKETS).labels(m)
        self.prefill = histogram("request_prefill_time_seconds", "Prefill forward on the prefill worker",
                                 REQUEST_BUCKETS).labels(m)
        self.handoff = histogram("kv_handoff_time_seconds", "KV push into the decode worker's reservation",
                                 LATENCY_BUCKETS).labels(m)
        self.handoff_bytes = counter("kv_handoff_bytes", "KV bytes pushed from prefill to decode workers").labels(m)
        self.handoff_failures = counter("kv_handoff_failures", "Requests aborted by a failed KV handoff").labels(m)
        self.migrated = counter("num_requests_migrated", "Finished requests that moved to other workers after a "
                                "worker was lost mid-stream or their KV handoff failed").labels(m)
        self.success = counter("request_success", "Finished requests by finish reason", ("finished_reason",))
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests").labels(m)
        self.generation_tokens = counter("generation_tokens", "Tokens generated for finished requests").labels(m)
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in prefix caches",
                                      ("role", "worker"))
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in prefix caches", ("role", "worker"))

    async def track(self, responses: AsyncIterator[pb.GenerateResponse]) -> AsyncIterator[pb.GenerateResponse]:
        """Pass one request's responses through, observing them; closing this closes `responses`."""
        last: float | None = None
        try:
            async for msg in responses:
                if msg.HasField("delta"):
                    now = time.perf_counter()
                    if last is not None and (n := len(msg.delta.token_ids)):
                        for _ in range(n):  # a delta may carry several tokens: spread the gap over them
                            self.itl.observe((now - last) / n)
                    last = now
                else:
                    self._finished(msg.final)
                yield msg
        except RouterError as err:
            if err.code == grpc.StatusCode.ABORTED and "KV handoff" in err.reason:
                self.handoff_failures.inc()
            raise
        finally:
            await responses.aclose()

    def _finished(self, final: pb.Final) -> None:
        t, u, m = final.timing, final.usage, self.model_name
        self.ttft.observe(t.ttft_ms / 1e3)
        self.e2e.observe(t.total_ms / 1e3)
        self.queue.observe(t.queue_ms / 1e3)
        self.prefill.observe(t.prefill_ms / 1e3)
        if final.decode_worker and final.decode_worker != final.prefill_worker:  # KV moved between workers
            self.handoff.observe(t.kv_handoff_ms / 1e3)
            self.handoff_bytes.inc(t.kv_handoff_bytes)
        self.success.labels(m, final.finish_reason).inc()
        self.prompt_tokens.inc(u.prompt_tokens)
        self.generation_tokens.inc(u.completion_tokens)
        if final.num_migrations:
            self.migrated.inc()
        role = "colocated" if final.decode_worker == final.prefill_worker else "prefill"
        self.prefix_queries.labels(m, role, final.prefill_worker).inc(u.prompt_tokens)
        self.prefix_hits.labels(m, role, final.prefill_worker).inc(u.cached_prompt_tokens)

    def worker_families(self, workers: list[tuple[WorkerInfo, WorkerLoad]]) -> list[Metric]:
        """Per-worker gauges from the registry's live load."""
        labels = ["model_name", "role", "worker"]
        running = GaugeMetricFamily("pdserve:num_requests_running", "Sequences running on the worker", labels=labels)
        waiting = GaugeMetricFamily("pdserve:num_requests_waiting", "Requests waiting on the worker", labels=labels)
        usage = GaugeMetricFamily("pdserve:kv_cache_usage_perc", "Fraction of the worker's KV blocks in use "
                                  "(1 = full)", labels=labels)
        for info, load in workers:
            key = [self.model_name, info.role, info.worker_id]
            running.add_metric(key, load.num_running)
            waiting.add_metric(key, load.num_waiting)
            used = 1.0 - load.free_kv_blocks / info.total_kv_blocks if info.total_kv_blocks else 0.0
            usage.add_metric(key, max(0.0, used))
        return [running, waiting, usage]

    def exposition(self, workers: list[tuple[WorkerInfo, WorkerLoad]]) -> bytes:
        """The text format of a scrape: every router process's series (multiprocess mode) or this one's, and
        the workers' gauges."""
        scrape = CollectorRegistry()
        if self.multiproc_dir:
            multiprocess.MultiProcessCollector(scrape, path=self.multiproc_dir)
        else:
            scrape.register(_Families(self.registry.collect()))
        scrape.register(_Families(self.worker_families(workers)))
        return generate_latest(scrape)
