"""Failure paths through one real cluster (local Ray, redis-server, router, 1 prefill + 2 decode workers,
gloo KV transport): client cancel, deadline, client death, bad input, overload, a reservation whose KV
never comes, and a decode worker killed mid-stream (with migration off: tests/test_migration.py has those
streams continue elsewhere). Every path ends at once with a clear status, and every KV block is back in its
pool as the workers themselves report it (GetStats), never assumed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from pdserve import AsyncClient, Client
from pdserve.errors import DeadlineExceededError, PdserveError
from pdserve.v1 import worker_pb2 as wpb
from pdserve.v1 import worker_pb2_grpc as wpb_grpc

from cluster.cluster_config import ClusterConfig, EngineOptions
from cluster.registry import Registry
from tests.cluster_harness import ClusterHarness
from tests.sdk_router_helpers import wait_for

pytestmark = pytest.mark.slow

POOL_BLOCKS = 128  # KV blocks per worker (x16 tokens = 2048 tokens)
MAX_LEN = 4096  # max_model_len, above one decode worker's pool, so "fits no worker" is reachable
MAX_QUEUE = 4  # router requests in flight
LONG_TOKENS = 1800  # one long request fits a decode worker alone; it runs for many seconds
LONG = {"max_tokens": LONG_TOKENS, "temperature": 0.0, "ignore_eos": True}
Code = grpc.StatusCode


def prompt(n: int, salt: int) -> list[int]:
    return [(salt * 131 + i * 7) % 1000 + 3 for i in range(n)]


@pytest.fixture(scope="module")
def harness(ray_session, tiny_llama):
    config = ClusterConfig(model=str(tiny_llama), prefill=1, decode=2, transport="gloo", port=0, http_port=0,
                           cluster_name="failures", max_queue=MAX_QUEUE, reserve_lease_ms=10_000, migration_limit=0,
                           engine=EngineOptions(num_kv_blocks=POOL_BLOCKS, max_num_seqs=8, max_model_len=MAX_LEN))
    yield (h := ClusterHarness(config))
    h.close()


def _worker_processes() -> list:  # type: ignore[type-arg]
    """This machine's worker engine processes (Ray actors), to stall them with SIGSTOP."""
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if "ray::WorkerActor" in " ".join(p.info["cmdline"] or [])]


def decode_running(harness: ClusterHarness) -> dict[str, int]:
    return {s.worker_id: s.num_running for s in harness.worker_stats() if s.role == "decode"}


def assert_freed_early(harness: ClusterHarness, times: list[float]) -> None:
    """Every block is free long before the request could have finished by itself: the cleanup freed it.
    `times`: when its deltas came (one token each; the first is prefill's), for its decode speed."""
    t_end, per_token = time.monotonic(), (times[-1] - times[1]) / (len(times) - 2)
    harness.wait_all_blocks_free()
    freed_in, natural = time.monotonic() - t_end, (LONG_TOKENS - len(times)) * per_token
    assert freed_in < natural / 2, f"freed after {freed_in:.2f}s; the request alone ends in ~{natural:.1f}s"


@pytest.mark.timeout(60, func_only=True)
def test_cancel_mid_stream_frees_kv_on_both_sides(harness):
    with Client(harness.address) as client:
        stream = client.generate_stream(prompt(40, 1), **LONG)
        times = [time.monotonic() for _ in zip(range(6), stream, strict=False)]
        assert sum(decode_running(harness).values()) == 1  # mid-stream: a decode worker runs it
        stream.close()
    assert_freed_early(harness, times)


@pytest.mark.timeout(90, func_only=True)
def test_request_id_is_reusable_right_after_its_cancel(harness):
    """The router keeps an id until the workers have freed it, and a request reusing it waits for that."""
    with Client(harness.address) as client:
        for i in range(20):  # cancelled while queued, in prefill, in the handoff, decoding
            stream = client.generate_stream(prompt(600, 100 + i), request_id="reused-id", max_tokens=1200,
                                            temperature=0.0, ignore_eos=True)
            time.sleep(i % 5 * 0.03)
            if i % 5 == 4:
                next(stream)
            stream.close()
            result = client.generate(prompt(24, 100 + i), request_id="reused-id", max_tokens=4, temperature=0.0,
                                     ignore_eos=True, timeout=20)
            assert len(result.token_ids) == 4
    harness.wait_all_blocks_free()


@pytest.mark.timeout(60, func_only=True)
def test_deadline_expiry_frees_kv(harness):
    times: list[float] = []
    with Client(harness.address) as client, pytest.raises(DeadlineExceededError) as exc:
        for _ in client.generate_stream(prompt(40, 2), timeout=1.0, **LONG):
            times.append(time.monotonic())
    assert exc.value.code == Code.DEADLINE_EXCEEDED and exc.value.reason
    assert len(times) > 3  # it was decoding when the deadline hit
    assert_freed_early(harness, times)


@pytest.mark.timeout(90, func_only=True)
def test_cancel_or_deadline_at_any_point_frees_kv(harness):
    """Cancels and deadlines landing anywhere: reserve, prefill, the KV push, the first decode steps."""
    big = {"max_tokens": 1200, "temperature": 0.0, "ignore_eos": True}  # 600-token prompts: a slow prefill
    with Client(harness.address) as client:
        for i in range(12):
            stream = client.generate_stream(prompt(600, 60 + i), **big)
            time.sleep(i * 0.025)
            stream.close()
        for i in range(6):
            with pytest.raises(DeadlineExceededError):
                client.generate(prompt(600, 80 + i), timeout=0.01 + i * 0.05, **big)
        harness.wait_all_blocks_free()
        result = client.generate(prompt(600, 60), max_tokens=8, temperature=0.0, ignore_eos=True)
        assert len(result.token_ids) == 8  # nothing is stuck either (transport pairs, queues)
    harness.wait_all_blocks_free()


@pytest.mark.timeout(60, func_only=True)
def test_room_freed_by_a_deadline_is_offered_again_at_once(harness):
    """Blocks a cancelled request gave back count as free right away, not one heartbeat later: a prompt
    that needs most of a decode worker's pool is accepted as soon as the workers report the room free."""
    big, registry = prompt((POOL_BLOCKS - 20) * 16, 7), Registry(harness.cluster.redis_url, "failures")
    with Client(harness.address) as client:
        with ThreadPoolExecutor(2) as pool:  # one reservation on each decode worker, dropped at the deadline
            errors = list(pool.map(lambda _: _error_of(client, big, timeout=0.2, max_tokens=300), range(2)))
        assert [e.code for e in errors] == [Code.DEADLINE_EXCEEDED] * 2, errors
        harness.wait_all_blocks_free()
        wait_for(lambda: all(load.free_kv_blocks == POOL_BLOCKS for _, load in registry.list_workers("decode")),
                   0.15, "the registry counts freed blocks as used")  # a heartbeat period is 0.5 s
        assert len(client.generate(big, max_tokens=4, temperature=0.0, ignore_eos=True).token_ids) == 4
    harness.wait_all_blocks_free()


CHILD = """import json, sys, time
from pdserve import Client
stream = Client(sys.argv[1]).generate_stream(**json.loads(sys.argv[2]))
times = [time.monotonic() for _ in zip(range(6), stream)]
print(json.dumps(times), flush=True)
time.sleep(600)"""


@pytest.mark.timeout(90, func_only=True)
def test_client_killed_mid_stream_frees_kv(harness):
    request = json.dumps({"prompt": prompt(40, 3), **LONG})
    child = subprocess.Popen([sys.executable, "-c", CHILD, harness.address, request],
                             stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        times = json.loads(child.stdout.readline())  # the child is mid-stream
        assert sum(decode_running(harness).values()) == 1
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        child.stdout.close()
    assert_freed_early(harness, times)


@pytest.mark.timeout(30, func_only=True)
@pytest.mark.parametrize(("prompt_", "kw", "reason"), [
    ("", {}, "prompt is empty"),
    ("Hello there", {"temperature": -1.0}, "temperature"),
    (prompt(MAX_LEN + 4, 4), {"max_tokens": 8}, "max_model_len"),
    ([5, 10**6], {}, "out of the vocabulary"),
], ids=["empty", "negative-temperature", "too-long", "bad-token-id"])
def test_bad_input_is_invalid_argument(harness, prompt_, kw, reason):
    with Client(harness.address, timeout=10) as client, pytest.raises(PdserveError) as exc:
        client.generate(prompt_, **{"max_tokens": 4, **kw})
    assert exc.value.code == Code.INVALID_ARGUMENT and reason in exc.value.reason, exc.value
    harness.wait_all_blocks_free()


@pytest.mark.timeout(60, func_only=True)
def test_router_queue_full_is_resource_exhausted_at_once(harness):
    """Two long requests fill the decode pools (router.admission), two more wait their turn, and with
    max_queue requests held the next ones are refused at once."""
    admission = harness.cluster.router.orchestrator.admission
    workers = _worker_processes()
    with Client(harness.address) as client:
        streams = [client.generate_stream(prompt(24, 10 + i), **LONG) for i in range(2)]
        try:
            for s in streams:
                next(s)  # running
            for w in workers:  # stalled engines: the two stay running however fast the engine would decode
                w.suspend()
            streams += [client.generate_stream(prompt(24, 12 + i), **LONG) for i in range(MAX_QUEUE - 2)]
            wait_for(lambda: admission.num_waiting == MAX_QUEUE - 2, 5.0, "the other two do not wait")
            t0 = time.monotonic()
            with ThreadPoolExecutor(4) as pool:
                errors = list(pool.map(lambda i: _error_of(client, prompt(24, 20 + i), **LONG), range(4)))
            assert time.monotonic() - t0 < 3.0
            for err in errors:
                assert err.code == Code.RESOURCE_EXHAUSTED and f"max_queue={MAX_QUEUE}" in err.reason, err
        finally:
            for w in workers:
                w.resume()
            for s in streams:
                s.close()
    harness.wait_all_blocks_free()


@pytest.mark.timeout(30, func_only=True)
def test_prompt_too_big_for_any_decode_worker_is_resource_exhausted(harness):
    n = (POOL_BLOCKS + 4) * 16  # fits max_model_len, not a decode worker's whole pool
    with Client(harness.address) as client:
        t0 = time.monotonic()
        err = _error_of(client, prompt(n, 5), max_tokens=8, temperature=0.0)
    assert time.monotonic() - t0 < 3.0
    assert err.code == Code.RESOURCE_EXHAUSTED and "KV blocks" in err.reason, err
    harness.wait_all_blocks_free()


def _error_of(client: Client, prompt_: list[int], **kw) -> PdserveError:
    try:
        client.generate(prompt_, **{"timeout": 20, "temperature": 0.0, "ignore_eos": True, **kw})
    except PdserveError as err:
        return err
    raise AssertionError("the request succeeded")


@pytest.mark.timeout(30, func_only=True)
def test_reservation_whose_kv_never_arrives_is_freed_at_lease_expiry(harness):
    decode = next(w for w in harness.cluster.worker_info if w["role"] == "decode")
    with harness.worker_channel(decode["address"]) as channel:
        stub = wpb_grpc.WorkerServiceStub(channel)

        def wait_reserved(n: int) -> None:
            stats = lambda: stub.GetStats(wpb.StatsRequest(), timeout=5)
            wait_for(lambda: (s := stats()).reserved_kv_blocks == n and s.free_kv_blocks == s.total_kv_blocks - n,
                       5.0, f"the decode worker does not report {n} reserved blocks")

        # 1. Nobody ever calls Decode: the lease timer frees the blocks.
        t0 = time.monotonic()
        reply = stub.Reserve(wpb.ReserveRequest(request_id="lease-1", num_tokens=100, lease_ms=800), timeout=5)
        assert len(reply.block_ids) == 7
        wait_reserved(7)
        wait_reserved(0)
        assert time.monotonic() - t0 >= 0.7  # held for its lease, then freed
        with pytest.raises(grpc.RpcError) as exc:
            stub.Decode(wpb.DecodeRequest(request_id="lease-1", token_ids=prompt(100, 6)), timeout=5)
        assert exc.value.code() == Code.NOT_FOUND
        # 2. Decode starts but the KV never comes: it gives up at the lease and frees the blocks.
        stub.Reserve(wpb.ReserveRequest(request_id="lease-2", num_tokens=100, lease_ms=800), timeout=5)
        with pytest.raises(grpc.RpcError) as exc:
            stub.Decode(wpb.DecodeRequest(request_id="lease-2", token_ids=prompt(100, 6)), timeout=10)
        assert exc.value.code() == Code.DEADLINE_EXCEEDED and "did not arrive" in exc.value.details()
        wait_reserved(0)
    harness.wait_all_blocks_free()


@pytest.mark.timeout(30, func_only=True)
def test_cancel_answers_found_only_for_an_id_the_worker_holds(harness):
    """Cancel of an id a worker never saw answers found=False (decode and prefill workers); of a live
    reservation found=True, and the reservation is freed."""
    for info in harness.cluster.worker_info:
        with harness.worker_channel(info["address"]) as channel:
            stub = wpb_grpc.WorkerServiceStub(channel)
            reply = stub.Cancel(wpb.CancelRequest(request_id=f"never-seen-{info['role']}"), timeout=5)
            assert reply.found is False, info
    decode = next(w for w in harness.cluster.worker_info if w["role"] == "decode")
    with harness.worker_channel(decode["address"]) as channel:
        stub = wpb_grpc.WorkerServiceStub(channel)
        stub.Reserve(wpb.ReserveRequest(request_id="cancel-me", num_tokens=40, lease_ms=10_000), timeout=5)
        assert stub.Cancel(wpb.CancelRequest(request_id="cancel-me"), timeout=5).found is True
        assert stub.Cancel(wpb.CancelRequest(request_id="cancel-me"), timeout=5).found is False  # already freed
    harness.wait_all_blocks_free()


@pytest.mark.timeout(30, func_only=True)
def test_deadline_during_a_late_registry_reply_leaks_no_counters(harness, monkeypatch):
    """Redis applied the router's placement (decode blocks and prefill inflight, one call) but the reply comes
    late, after the client's deadline: the router still takes it back, else it stays counted until the TTL."""
    registry, check = harness.cluster.router.orchestrator.registry, Registry(harness.cluster.redis_url, "failures")
    real = registry.place

    async def late_reply(*args, **kwargs):
        result = await real(*args, **kwargs)
        await asyncio.sleep(0.5)
        return result

    monkeypatch.setattr(registry, "place", late_reply)
    with Client(harness.address) as client, pytest.raises(DeadlineExceededError):
        client.generate(prompt(24, 90), max_tokens=4, timeout=0.25)
    monkeypatch.undo()
    ids = [w["worker_id"] for w in harness.cluster.worker_info]  # incr_inflight(w, 0) reads the count
    wait_for(lambda: not any(check.outstanding_blocks(w) or check.incr_inflight(w, 0) for w in ids), 5.0,
               "the router's registry counters leaked")
    harness.wait_all_blocks_free()


async def _kill_decode_mid_stream(harness: ClusterHarness, ray) -> str:
    async with AsyncClient(harness.address) as client:
        # MAX_QUEUE requests that fit the decode pools together, so the router admits them all at once
        fitting = {**LONG, "max_tokens": 2 * POOL_BLOCKS * 16 // MAX_QUEUE - 24}
        streams = [client.generate_stream(prompt(24, 30 + i), **fitting) for i in range(MAX_QUEUE)]
        for s in streams:
            for _ in range(3):
                await s.__anext__()  # each is decoding
        running = await asyncio.to_thread(decode_running, harness)
        victim = max(running, key=lambda w: running[w])
        assert running[victim] > 0 and sum(running.values()) == MAX_QUEUE, running
        info = harness.cluster.worker_info
        ray.kill(harness.cluster.workers[next(i for i, w in enumerate(info) if w["worker_id"] == victim)])
        t_kill = time.monotonic()
        tasks = [asyncio.ensure_future(s.result()) for s in streams]
        failed: list[PdserveError] = []
        while len(failed) < running[victim] and time.monotonic() - t_kill < 10:
            await asyncio.wait([t for t in tasks if not t.done()], timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            failed = [t.exception() for t in tasks if t.done()]
        elapsed = time.monotonic() - t_kill
        for s in streams:
            s.close()  # the survivors (still streaming from the other decode worker)
        await asyncio.gather(*tasks, return_exceptions=True)
    assert len(failed) == running[victim] and elapsed < 5.0, (failed, elapsed)
    for err in failed:
        assert isinstance(err, PdserveError) and err.code in (Code.UNAVAILABLE, Code.ABORTED), err
        assert victim in err.reason, err
    return victim


@pytest.mark.timeout(90, func_only=True)
def test_killed_decode_worker_fails_its_streams_and_cluster_recovers(harness, ray_session):
    """Last: it leaves the cluster one decode worker short."""
    registry = Registry(harness.cluster.redis_url, harness.cluster.config.cluster_name, secret=harness.cluster.secret)
    infos = {w.worker_id: w for w, _ in registry.list_workers("decode")}
    victim = asyncio.run(_kill_decode_mid_stream(harness, ray_session))
    (survivor,) = set(infos) - {victim}
    # The state a crash leaves for up to a heartbeat TTL: the dead worker still registered, and (another
    # router's pending reservation on the survivor) the roomiest, so every placement picks it first.
    registry.register(infos[victim], ttl_s=3.0)
    assert registry.reserve_decode(8, worker_id=survivor) == survivor
    with Client(harness.address, timeout=30) as client:
        try:
            for i in range(3):  # its Reserve fails (UNAVAILABLE): the router moves on to the survivor
                result = client.generate(prompt(24, 40 + i), max_tokens=8, temperature=0.0, ignore_eos=True)
                assert len(result.token_ids) == 8 and result.decode_worker == survivor
        finally:
            registry.release_decode(survivor, 8)
        wait_for(lambda: client.server_info().num_decode_workers == 1, 10.0, "the dead worker is registered")
        assert client.generate(prompt(24, 50), max_tokens=8, temperature=0.0).finish_reason in ("length", "stop")
    stats = harness.wait_all_blocks_free()
    assert sorted(s.role for s in stats) == ["decode", "prefill"]
