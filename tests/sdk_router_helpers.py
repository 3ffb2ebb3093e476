"""Scripted workers and a router cluster for the SDK/router tests (test_sdk_router, test_colocated).

Workers are small WorkerService servers with scripted behaviour (real gRPC, no model); `Cluster` runs a
router in a background event loop against them and a real redis-server, under a fresh cluster name.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pdserve
from pdserve.v1 import worker_pb2 as wpb
from pdserve.v1 import worker_pb2_grpc

from cluster.registry import Registry, WorkerInfo, WorkerLoad
from router.config import RouterConfig
from router.server import RouterServer, serve
from tests.redis_fixtures import unique_cluster

BLOCK = 4


class FakeWorker(worker_pb2_grpc.WorkerServiceServicer):
    """A scripted worker: decode sends `tokens` one per engine step (after `delay_s` each) on the router's
    Attach stream, like a real worker."""

    def __init__(self, role: str, *, reserve_code: grpc.StatusCode | None = None,
                 prefill_code: grpc.StatusCode | None = None, tokens: tuple[int, ...] = (5, 6, 7),
                 delay_s: float = 0.0) -> None:
        self.role, self.reserve_code, self.prefill_code = role, reserve_code, prefill_code
        self.tokens, self.delay_s = tokens, delay_s
        self.calls: list[tuple[str, str]] = []
        self.cancels: list[str] = []
        self.routers: dict[str, queue.SimpleQueue[wpb.EngineStep | None]] = {}
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Reserve(self, req: wpb.ReserveRequest, ctx: grpc.ServicerContext) -> wpb.ReserveReply:
        self.calls.append(("Reserve", req.request_id))
        if self.reserve_code is not None:
            ctx.abort(self.reserve_code, "no room for the KV")
        n = -(-req.num_tokens // BLOCK)
        return wpb.ReserveReply(block_ids=list(range(n)), transport="grpc", transport_endpoint="fake:1")

    def Prefill(self, req: wpb.PrefillRequest, ctx: grpc.ServicerContext) -> wpb.PrefillReply:
        self.calls.append(("Prefill", req.request_id))
        if self.prefill_code is not None:
            ctx.abort(self.prefill_code, "KV push to fake:1 failed")
        assert req.dest.transport_endpoint == "fake:1" and len(req.dest.block_ids) == -(-len(req.token_ids) // BLOCK)
        reply = wpb.PrefillReply(first_token_id=4, timing=wpb.PrefillTiming(queue_ms=1, prefill_ms=2,
                                                                             kv_handoff_ms=3))
        if req.sampling.HasField("logprobs"):
            reply.first_logprobs.token_id, reply.first_logprobs.logprob = 4, -0.5
        if req.sampling.max_tokens == 1:  # the first token ends the request: no KV push, no decode
            reply.finish_reason, reply.text = "length", "w4"
        return reply

    def Attach(self, req: wpb.AttachRequest, ctx: grpc.ServicerContext) -> Iterator[wpb.OutputBatch]:
        q = self.routers[req.router_id] = queue.SimpleQueue()
        yield wpb.OutputBatch()  # attached
        while ctx.is_active():
            try:
                step = q.get(timeout=0.05)
            except queue.Empty:
                continue
            yield wpb.OutputBatch(steps=[step])

    def run(self, router_id: str, request_id: str, outputs: list[wpb.RequestOutput],
            step_ms: tuple[float, ...] = (0.5,)) -> None:
        """Send `outputs` one per step on the router's stream, `delay_s` apart, until the request is cancelled;
        step i took `step_ms[i]` (0.1 past the end)."""
        def steps() -> None:
            for i, out in enumerate(outputs):
                time.sleep(self.delay_s)
                if request_id in self.cancels:
                    return
                out.request_id = request_id
                ms = step_ms[i] if i < len(step_ms) else 0.1
                self.routers[router_id].put(wpb.EngineStep(step_ms=ms, outputs=[out]))

        threading.Thread(target=steps, daemon=True).start()

    def Decode(self, req: wpb.DecodeRequest, ctx: grpc.ServicerContext) -> wpb.DecodeReply:
        self.calls.append(("Decode", req.request_id))
        n = min(len(self.tokens), req.sampling.max_tokens - 1)
        self.run(req.router_id, req.request_id, [
            wpb.RequestOutput(token_ids=[t], text=(f"w{req.first_token_id}" if i == 0 else "") + f" w{t}",
                              finish_reason="length" if i == n - 1 else "")
            for i, t in enumerate(self.tokens[:n])])
        return wpb.DecodeReply(kv_wait_ms=0.1)

    def Cancel(self, req: wpb.CancelRequest, ctx: grpc.ServicerContext) -> wpb.CancelReply:
        self.cancels.append(req.request_id)
        return wpb.CancelReply(found=True)


class Cluster:
    """A router in a background event loop, plus registered fake workers, under a fresh cluster name."""

    def __init__(self, redis_url: str, model_dir: Path, **config: object) -> None:
        self.name = unique_cluster("sdk")
        self.registry = Registry(redis_url, self.name)
        self.workers: list[FakeWorker] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        cfg = RouterConfig(model_dir=str(model_dir), redis_url=redis_url, cluster_name=self.name,
                           max_model_len=32, health_interval_s=0.1, **config)  # type: ignore[arg-type]
        self.router: RouterServer = self._run(serve(cfg))
        self.client = pdserve.Client(self.router.address, timeout=10)

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    def add(self, worker_id: str, role: str, free_blocks: int = 100, **kw: object) -> FakeWorker:
        w = FakeWorker(role, **kw)  # type: ignore[arg-type]
        info = WorkerInfo(worker_id, role, f"127.0.0.1:{w.port}", "tiny", "grpc", "", 100, BLOCK)
        self.registry.register(info, ttl_s=60, load=WorkerLoad(0, 0, free_blocks, 0))
        self.workers.append(w)
        return w

    def close(self) -> None:
        self.client.close()
        self._run(self.router.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        for w in self.workers:
            w.server.stop(0)
        self.registry.close()


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition not met") -> None:
    """Poll `cond` every 10 ms; fail with `what` once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}, still after {timeout}s"
        time.sleep(0.01)
