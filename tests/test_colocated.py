"""Colocated mode: the same cluster with workers that prefill and decode in one engine (no KV transport).

The router's colocated flow against scripted workers (real gRPC and redis-server, as in test_sdk_router):
placement, retry past an unreachable worker, counters, cancel, health. End to end on CPU (slow: local Ray,
real redis-server, router, 2 colocated workers, the SDK): outputs equal the offline engine's token for token
with 32 concurrent requests (chunked prefill on, so prompt chunks share steps with running decodes), a
cancel mid-stream frees every block, and the router reports the mode.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pdserve
import pytest
from pdserve import Client
from pdserve.v1 import worker_pb2 as wpb

from cluster.cluster_config import ClusterConfig, EngineOptions
from cluster.config import EngineConfig
from cluster.registry import WorkerInfo, WorkerLoad
from cluster.worker.config import WorkerConfig
from router.config import RouterConfig
from tests.cluster_harness import ClusterHarness
from tests.sdk_router_helpers import BLOCK, FakeWorker, wait_for
from tests.test_cluster_e2e import _generate_all, offline  # noqa: F401 - offline: the fixture
from tests.test_sdk_router import make_cluster  # noqa: F401 - a fixture

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "examples" / "cpu-colocated.yaml"


def test_config_counts_and_validation() -> None:
    assert ClusterConfig(mode="colocated").worker_roles() == ["colocated"] * 2  # default: prefill + decode
    assert ClusterConfig(mode="colocated", colocated=3).worker_roles() == ["colocated"] * 3
    assert ClusterConfig(mode="colocated", transport="grpc").resolved_transport() == "none"
    gpu = ClusterConfig(device="cuda")  # "auto": direct copies on one host, NCCL across hosts
    assert (gpu.resolved_transport(one_host=True), gpu.resolved_transport()) == ("cuda_ipc", "nccl")
    assert ClusterConfig().resolved_transport(one_host=True) == "gloo"
    assert ClusterConfig(device="cuda", transport="nccl").resolved_transport(one_host=True) == "nccl"
    assert ClusterConfig(prefill=2).worker_roles() == ["prefill", "prefill", "decode"]
    with pytest.raises(ValueError, match="mode 'colocated'"):
        ClusterConfig(colocated=2)
    with pytest.raises(ValueError, match="at least one colocated"):
        ClusterConfig(mode="colocated", colocated=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        ClusterConfig(mode="mixed")
    with pytest.raises(ValueError, match="mode must be one of"):
        RouterConfig(model_dir="m", redis_url="redis://x", mode="mixed")
    assert RouterConfig(model_dir="m", redis_url="redis://x", mode="colocated").serving_roles == ("colocated",)
    example = ClusterConfig.from_yaml(EXAMPLE)
    assert example.mode == "colocated" and example.worker_roles() == ["colocated"] * 2


def test_worker_config_pairs_role_and_transport() -> None:
    engine = EngineConfig(model="m")
    WorkerConfig(role="colocated", engine=engine, redis_url="redis://x", transport="none")
    with pytest.raises(ValueError, match="'none'"):
        WorkerConfig(role="colocated", engine=engine, redis_url="redis://x", transport="gloo")
    with pytest.raises(ValueError, match="'none'"):
        WorkerConfig(role="decode", engine=engine, redis_url="redis://x", transport="none")


@pytest.fixture(scope="module")
def model_dir(tiny_llama: Path) -> Path:
    """For `make_cluster`'s router, which reads only the tokenizer and config: the session's tiny model."""
    return tiny_llama


class FakeColocated(FakeWorker):
    """A scripted colocated worker: Generate sends token 4 (the prefill step), then `tokens`, one per step."""

    def Generate(self, req: wpb.WorkerGenerateRequest, ctx: grpc.ServicerContext) -> wpb.WorkerGenerateReply:
        self.calls.append(("Generate", req.request_id))
        tokens = (4, *self.tokens)[: req.sampling.max_tokens]
        self.run(req.router_id, req.request_id, [
            wpb.RequestOutput(token_ids=[t], text=f" w{t}", finish_reason="length" if i == len(tokens) - 1 else "",
                              num_cached_tokens=1 if i == 0 else 0)
            for i, t in enumerate(tokens)], step_ms=(2.0, 0.5))
        return wpb.WorkerGenerateReply()


def add_colocated(cluster, worker_id: str, load: int = 0, **kw: object) -> FakeColocated:  # type: ignore[no-untyped-def]
    w = FakeColocated("colocated", **kw)  # type: ignore[arg-type]
    info = WorkerInfo(worker_id, "colocated", f"127.0.0.1:{w.port}", "tiny", "none", "", 100, BLOCK)
    cluster.registry.register(info, ttl_s=60, load=WorkerLoad(load, 0, 100, 0))
    cluster.workers.append(w)
    return w


def test_router_colocated_flow(make_cluster, caplog) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    c = make_cluster(mode="colocated")
    c.add("p0", "prefill")
    c.add("d0", "decode")
    assert c.client.health() == "NOT_SERVING"  # the pools of the other mode do not count
    with pytest.raises(pdserve.UnavailableError, match="no colocated workers"):
        c.client.generate("hello world")
    dead = WorkerInfo("c-dead", "colocated", "127.0.0.1:1", "tiny", "none", "", 100, BLOCK)
    c.registry.register(dead, ttl_s=60)  # idle, so the least loaded: tried first, unreachable
    w = add_colocated(c, "c1", load=3)
    wait_for(lambda: c.client.health() == "SERVING")
    r = c.client.generate("hello world", max_tokens=4, request_id="co-1")
    assert (r.text, r.token_ids, r.finish_reason) == (" w4 w5 w6 w7", [4, 5, 6, 7], "length")
    assert (r.prefill_worker, r.decode_worker) == ("c1", "c1") and w.calls == [("Generate", "co-1")]
    assert "generate on worker c-dead" in caplog.text and "trying the next worker" in caplog.text
    assert r.usage.prompt_tokens > 2 and (r.usage.completion_tokens, r.usage.cached_prompt_tokens) == (4, 1)
    assert (r.timing.prefill_ms, r.timing.kv_handoff_ms, r.timing.first_decode_step_ms) == (2, 0, 0.5)
    assert r.timing.queue_ms >= 0 and 0 < r.timing.ttft_ms <= r.timing.total_ms
    assert c.registry.incr_inflight("c1", 0) == c.registry.incr_inflight("c-dead", 0) == 0  # both released
    assert [d.token_ids for d in c.client.generate_stream("hello", max_tokens=1)][0] == [4]
    info = c.client.server_info()
    assert (info.mode, info.num_prefill_workers, info.num_decode_workers, info.transport) == (
        "colocated", 2, 2, "none")


def test_router_colocated_cancel(make_cluster) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    c = make_cluster(mode="colocated", policy="prefix_aware")
    w = add_colocated(c, "c0", tokens=tuple(range(5, 20)), delay_s=0.2)
    for delta in c.client.generate_stream("hello", max_tokens=16, request_id="gone"):
        assert delta.token_ids == [4]
        break
    wait_for(lambda: "gone" in w.cancels and c.router.orchestrator.num_inflight == 0)
    wait_for(lambda: c.registry.incr_inflight("c0", 0) == 0)
    add_colocated(c, "c1")
    prompt = list(range(3, 12))  # two full blocks: prefix_aware keeps it on the worker that cached it
    first = c.client.generate(prompt, max_tokens=2).prefill_worker
    assert all(c.client.generate(prompt + [3], max_tokens=2).prefill_worker == first for _ in range(3))


@pytest.fixture(scope="module")
def harness(ray_session, tiny_llama):
    config = ClusterConfig(model=str(tiny_llama), mode="colocated", colocated=2, port=0, http_port=0,
                           cluster_name="colocated", max_queue=48,
                           engine=EngineOptions(num_kv_blocks=96, max_num_seqs=32, enable_chunked_prefill=True,
                                                max_num_batched_tokens=64))
    h = ClusterHarness(config)
    yield h
    h.close()


@pytest.mark.slow
def test_concurrent_requests_match_offline(harness, offline):  # noqa: F811 - the imported fixture
    got = asyncio.run(_generate_all(harness.address))
    assert got == offline
    stats = harness.wait_all_blocks_free()
    assert [s.role for s in stats] == ["colocated", "colocated"]
    assert all(s.num_prefix_cached_blocks > 0 for s in stats)  # both workers ran prompts (blocks stay cached)


@pytest.mark.slow
def test_stream_reports_one_worker_and_timing(harness):
    with Client(harness.address) as client:
        stream = client.generate_stream("Timing please", max_tokens=6, temperature=0, ignore_eos=True)
        deltas = list(stream)
        result = stream.result()
    assert deltas[0].token_ids == result.token_ids[:1]  # the first delta carries the first token
    assert sum(len(d.token_ids) for d in deltas) == 6 == len(result.token_ids) == result.usage.completion_tokens
    assert result.finish_reason == "length"
    assert result.prefill_worker == result.decode_worker and result.prefill_worker.startswith("colocated-")
    timing = result.timing
    assert timing.kv_handoff_ms == 0 and timing.prefill_ms > 0 and timing.first_decode_step_ms > 0
    assert timing.total_ms >= timing.ttft_ms > 0


@pytest.mark.slow
@pytest.mark.timeout(60, func_only=True)
def test_cancel_mid_stream_frees_every_block(harness):
    with Client(harness.address) as client:
        stream = client.generate_stream("Cancel me " * 20, max_tokens=1000, temperature=0, ignore_eos=True)
        got = [d for _, d in zip(range(5), stream, strict=False)]
        assert len(got) == 5 and sum(s.num_running for s in harness.worker_stats()) == 1
        t_cancel = time.monotonic()
        stream.close()
    harness.wait_all_blocks_free(timeout_s=5)
    assert time.monotonic() - t_cancel < 5


@pytest.mark.slow
def test_server_info_says_colocated(harness):
    with Client(harness.address) as client:
        info = client.server_info()
        assert client.health() == "SERVING"
    assert (info.mode, info.num_prefill_workers, info.num_decode_workers, info.transport) == (
        "colocated", 2, 2, "none")


def _attach(harness, router_id: str):  # type: ignore[no-untyped-def]
    """A router's Attach stream to the first worker, by hand: (channel, stub, stream after its first message)."""
    from pdserve.v1 import generate_pb2 as pb
    from pdserve.v1 import worker_pb2_grpc

    channel = harness.worker_channel(harness.cluster.worker_info[0]["address"])
    stub = worker_pb2_grpc.WorkerServiceStub(channel)
    stream = stub.Attach(wpb.AttachRequest(router_id=router_id))
    assert not next(stream).steps  # the empty first message: attached
    sampling = pb.SamplingParams(max_tokens=8, temperature=0.0, top_k=-1, top_p=1.0, ignore_eos=True)
    return channel, stub, stream, sampling


@pytest.mark.slow
@pytest.mark.timeout(60, func_only=True)
def test_a_step_s_outputs_for_a_router_travel_in_one_message(harness):
    channel, stub, stream, sampling = _attach(harness, "batch-test")
    rids = [f"batched-{i}" for i in range(4)]
    for i, rid in enumerate(rids):
        stub.Generate(wpb.WorkerGenerateRequest(request_id=rid, token_ids=[5 + i, 6, 7, 8], sampling=sampling,
                                                router_id="batch-test"), timeout=10)
    tokens: dict[str, int] = dict.fromkeys(rids, 0)
    finished: set[str] = set()
    widest = 0
    while finished != set(rids):
        for step in next(stream).steps:
            widest = max(widest, len(step.outputs))
            for out in step.outputs:
                tokens[out.request_id] += len(out.token_ids)
                if out.finish_reason:
                    assert out.finish_reason == "length"
                    finished.add(out.request_id)
    assert tokens == dict.fromkeys(rids, 8)
    assert widest >= 2  # requests decoding together leave their step as one message
    channel.close()
    harness.wait_all_blocks_free()


@pytest.mark.slow
@pytest.mark.timeout(60, func_only=True)
def test_a_router_whose_stream_ends_has_its_requests_aborted(harness):
    channel, stub, stream, sampling = _attach(harness, "gone-test")
    sampling.max_tokens = 1000
    stub.Generate(wpb.WorkerGenerateRequest(request_id="orphan", token_ids=[5, 6, 7], sampling=sampling,
                                            router_id="gone-test"), timeout=10)
    assert any(out.request_id == "orphan" for step in next(stream).steps for out in step.outputs)
    with pytest.raises(grpc.RpcError) as exc:  # a Generate for a router without a stream is refused
        stub.Generate(wpb.WorkerGenerateRequest(request_id="x", token_ids=[5], sampling=sampling), timeout=10)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    stream.cancel()
    harness.wait_all_blocks_free(timeout_s=5)
    channel.close()


@pytest.mark.slow
@pytest.mark.timeout(90, func_only=True)
def test_a_dead_front_end_is_replaced_and_the_worker_serves_again(harness):
    import os
    import signal

    import psutil
    from pdserve.v1 import worker_pb2_grpc

    from cluster.registry import Registry

    registry = Registry(harness.cluster.redis_url, "colocated", secret=harness.cluster.secret)
    info = next(w for w, _ in registry.list_workers() if w.worker_id == "colocated-0")
    port = int(info.address.rsplit(":", 1)[1])
    pid = next(c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port)
    assert "cluster.worker.frontend" in " ".join(psutil.Process(pid).cmdline())
    os.kill(pid, signal.SIGKILL)

    def moved() -> bool:
        return any(w.worker_id == "colocated-0" and w.address != info.address for w, _ in registry.list_workers())

    wait_for(moved, timeout=30, what="the worker did not re-register with a new front end")
    new = next(w for w, _ in registry.list_workers() if w.worker_id == "colocated-0")
    with Client(harness.address) as client:  # at once: the router's view still has the old address
        results = [client.generate(f"after {i}", max_tokens=4, temperature=0) for i in range(6)]
    assert all(len(r.token_ids) == 4 for r in results)
    assert any(r.decode_worker == "colocated-0" for r in results)  # it found the new one, not only the other worker
    with harness.worker_channel(new.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        assert stub.GetStats(wpb.StatsRequest(), timeout=5).worker_id == "colocated-0"
        wait_for(lambda: (s := stub.GetStats(wpb.StatsRequest(), timeout=5)).free_kv_blocks == s.total_kv_blocks,
                 timeout=10, what="blocks still held")
    registry.close()


@pytest.mark.slow
@pytest.mark.timeout(60, func_only=True)
def test_killed_worker_s_streams_continue_on_the_other_one(harness, ray_session, tiny_llama):
    """Last: it kills a worker. Its requests move to the other worker, which prefills prompt + tokens sent in
    its own engine and streams on: outputs equal the offline engine's."""
    from pdserve import AsyncClient

    from cluster.engine import LLM, SamplingParams

    prompts = [f"Colocated request {i} about the sea" + " again" * (i % 3) for i in range(8)]
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    expected = [(o.token_ids, o.text) for o in LLM(str(tiny_llama), num_kv_blocks=256).generate(prompts, params)]

    async def run() -> tuple[str, list[object]]:
        async with AsyncClient(harness.address, timeout=60) as client:
            streams = [client.generate_stream(p, max_tokens=64, temperature=0.0, ignore_eos=True) for p in prompts]
            for s in streams:
                await s.__anext__(), await s.__anext__()
            running = {s.worker_id: s.num_running for s in await asyncio.to_thread(harness.worker_stats)}
            victim = max(running, key=lambda w: running[w])
            ray_session.kill(harness.cluster.workers[next(
                i for i, w in enumerate(harness.cluster.worker_info) if w["worker_id"] == victim)])
            for s in streams:
                async for _ in s:
                    pass
            return victim, [await s.result() for s in streams]

    victim, results = asyncio.run(run())
    assert [(r.token_ids, r.text) for r in results] == expected
    assert all(r.decode_worker != victim and r.usage.completion_tokens == 64 for r in results)
    assert any(r.num_migrations == 1 for r in results)
    harness.wait_all_blocks_free(timeout_s=15)
