"""The Registry against a real redis-server (no mocks): liveness, reservations, one-call placement and
release, bounded connection pools. The RedisServer process itself: test_redis_server."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pdserve
import pytest
import redis.asyncio
import redis.exceptions
from pdserve.v1 import worker_pb2 as wpb
from tokenizers import Tokenizer, models, pre_tokenizers

from cluster.redis_server import RedisServer
from cluster.registry import AsyncRegistry, Placement, Registry, WorkerInfo, WorkerLoad
from tests import redis_fixtures
from tests.redis_fixtures import unique_cluster
from tests.sdk_router_helpers import BLOCK, Cluster, FakeWorker
from tests.test_sdk_router import make_cluster  # noqa: F401 - a fixture

# the shared fixtures (also fine once tests/conftest.py imports them: same objects)
redis_server = redis_fixtures.redis_server
registry = redis_fixtures.registry


def info(worker_id: str, role: str = "decode", blocks: int = 100) -> WorkerInfo:
    return WorkerInfo(worker_id, role, f"{worker_id}:5000", "tiny", "grpc", "", blocks, 16)


# --- registration, listing, liveness ---------------------------------------------------------------


def test_register_and_list(registry: Registry) -> None:
    registry.register(info("d2", blocks=50), ttl_s=10)
    registry.register(info("d1"), ttl_s=10, load=WorkerLoad(1, 2, 80, 5))
    registry.register(WorkerInfo("p1", "prefill", "h:1", "tiny", "nccl", "h:29500", 10, 16), 10)
    workers = registry.list_workers()
    assert [w.worker_id for w, _ in workers] == ["d1", "d2", "p1"]
    assert workers[0] == (info("d1"), WorkerLoad(1, 2, 80, 5))
    assert workers[1][1] == WorkerLoad(0, 0, 50, 0)  # default: idle, every block free
    assert workers[2][0].transport_endpoint == "h:29500"
    assert [w.worker_id for w, _ in registry.list_workers("decode")] == ["d1", "d2"]
    assert registry.list_workers("colocated") == []


def test_clusters_are_isolated(redis_server: RedisServer) -> None:
    a, b = Registry(redis_server.url, unique_cluster()), Registry(redis_server.url, unique_cluster())
    a.register(info("d1"), 10)
    assert b.list_workers() == [] and b.reserve_decode(1) is None
    assert [w.worker_id for w, _ in a.list_workers()] == ["d1"]


def test_invalid_arguments(registry: Registry) -> None:
    with pytest.raises(ValueError, match="role"):
        info("x", role="router")
    with pytest.raises(ValueError, match="TTL"):
        registry.register(info("d1"), ttl_s=0)
    with pytest.raises(ValueError, match="num_blocks"):
        registry.reserve_decode(-1)
    with pytest.raises(ValueError, match="braces"):
        Registry(registry.redis, "a{b}")


def test_heartbeat_updates_load_and_expiry(registry: Registry) -> None:
    registry.register(info("d1"), ttl_s=0.5)
    registry.register(info("d2"), ttl_s=0.5)
    assert registry.heartbeat("d2", WorkerLoad(3, 4, 60, 7), ttl_s=10)  # extends d2's life
    time.sleep(0.7)  # d1 has not heartbeated: gone
    assert [(w.worker_id, ld) for w, ld in registry.list_workers()] == [("d2", WorkerLoad(3, 4, 60, 7))]
    assert registry.reserve_decode(1) == "d2"
    assert not registry.heartbeat("d1", WorkerLoad(0, 0, 100, 0), ttl_s=1)  # expired: must re-register
    assert registry.heartbeat("d2", WorkerLoad(0, 0, 60, 0), ttl_s=0.3)
    time.sleep(0.5)
    assert registry.list_workers() == []
    assert registry.reserve_decode(1, worker_id="d2") is None


def test_deregister(registry: Registry) -> None:
    registry.register(info("d1"), 10)
    assert registry.reserve_decode(5) == "d1"
    assert registry.deregister("d1")
    assert not registry.deregister("d1")
    assert registry.list_workers() == [] and registry.outstanding_blocks("d1") == 0


# --- decode reservations ----------------------------------------------------------------------------


def test_reserve_picks_most_headroom(registry: Registry) -> None:
    registry.register(info("d1", blocks=100), 10)
    registry.register(info("d2", blocks=60), 10)
    registry.register(info("c1", role="colocated", blocks=500), 10)
    assert registry.reserve_decode(50) == "d1"  # headroom d1 100, d2 60
    assert registry.reserve_decode(10) == "d2"  # d1 50, d2 60
    assert registry.reserve_decode(10) == "d1"  # d1 50, d2 50: tie -> smaller id
    assert (registry.outstanding_blocks("d1"), registry.outstanding_blocks("d2")) == (60, 10)
    assert registry.reserve_decode(51) is None  # nobody fits; the colocated worker is not a decode worker
    assert registry.reserve_decode(51, role="colocated") == "c1"
    assert registry.reserve_decode(40, worker_id="d2") == "d2"  # named: headroom 60 - 10
    assert registry.reserve_decode(11, worker_id="d2") is None
    assert registry.reserve_decode(1, worker_id="nope") is None
    assert registry.reserve_decode(0) == "d1"  # zero blocks: still the roomiest worker (d1 40, d2 10)


def test_release_floor_and_commit(registry: Registry) -> None:
    registry.register(info("d1", blocks=100), 10)
    assert registry.reserve_decode(30) == "d1"
    assert registry.reserve_decode(20) == "d1"
    assert registry.release_decode("d1", 20) == 30
    assert registry.release_decode("d1", 1000) == 0  # never below zero
    assert registry.release_decode("d1", 5) == 0
    assert registry.release_decode("ghost", 5) == 0
    assert registry.outstanding_blocks("d1") == 0
    assert registry.reserve_decode(100) == "d1"  # all headroom restored
    # committed: the worker accepted; the blocks move into the published snapshot until the next heartbeat
    assert registry.release_decode("d1", 100, committed=True) == 0
    assert registry.list_workers()[0][1] == WorkerLoad(0, 0, 0, 100)
    assert registry.reserve_decode(1) is None
    registry.heartbeat("d1", WorkerLoad(0, 1, 40, 0), ttl_s=10)  # the worker's truth replaces the snapshot
    assert registry.reserve_decode(40) == "d1"


def test_outstanding_counter_expires(redis_server: RedisServer) -> None:
    reg = Registry(redis_server.url, unique_cluster(), counter_ttl_s=0.5)
    reg.register(info("d1", blocks=10), 10)
    assert reg.reserve_decode(10) == "d1" and reg.reserve_decode(1) is None
    time.sleep(0.7)  # a router that died without releasing does not leak headroom forever
    assert reg.outstanding_blocks("d1") == 0 and reg.reserve_decode(10) == "d1"


def _hammer(url: str, cluster: str, seed: int, out: list[tuple[str, int]]) -> None:
    reg, rng = Registry(url, cluster), random.Random(seed)
    misses = 0
    while misses < 5:
        n = rng.randint(1, 7)
        wid = reg.reserve_decode(n)
        if wid is None:
            misses += 1
        else:
            out.append((wid, n))
    reg.close()


def _check_no_overcommit(reg: Registry, got: list[tuple[str, int]], free: dict[str, int]) -> None:
    for wid, cap in free.items():
        taken = sum(n for w, n in got if w == wid)
        assert taken <= cap
        assert reg.outstanding_blocks(wid) == taken
        assert cap - taken < 7  # they only stop once nothing fits any more
    for wid, n in got:
        reg.release_decode(wid, n)
    assert all(reg.outstanding_blocks(w) == 0 for w in free)


def test_reserve_concurrent_threads(redis_server: RedisServer) -> None:
    reg, free = Registry(redis_server.url, unique_cluster()), {"d1": 97, "d2": 41}
    for wid, cap in free.items():
        reg.register(info(wid, blocks=cap), 10)
    got: list[tuple[str, int]] = []  # list.append is atomic under the GIL
    args = [(redis_server.url, reg.cluster, i, got) for i in range(8)]
    threads = [threading.Thread(target=_hammer, args=a) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _check_no_overcommit(reg, got, free)


def _hammer_proc(url: str, cluster: str, seed: int, q: multiprocessing.Queue) -> None:
    out: list[tuple[str, int]] = []
    _hammer(url, cluster, seed, out)
    q.put(out)


def test_reserve_concurrent_processes(redis_server: RedisServer) -> None:
    cluster, free = unique_cluster(), {"d1": 150, "d2": 64, "d3": 5}
    reg = Registry(redis_server.url, cluster)
    for wid, cap in free.items():
        reg.register(info(wid, blocks=cap), 10)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_hammer_proc, args=(redis_server.url, cluster, i, q)) for i in range(4)]
    for p in procs:
        p.start()
    got = [x for _ in procs for x in q.get(timeout=30)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    _check_no_overcommit(reg, got, free)


# --- prefill placement --------------------------------------------------------------------------------


def test_place_takes_decode_and_prompt_together(registry: Registry) -> None:
    for wid in ("p1", "p2"):
        registry.register(info(wid, role="prefill"), 10)
    registry.register(info("d1", blocks=30), 10)
    registry.register(info("d2", blocks=20), 10)
    registry.heartbeat("p1", WorkerLoad(2, 1, 10, 0), 10)
    registry.heartbeat("p2", WorkerLoad(0, 2, 10, 0), 10)
    first = registry.place("prefill", decode_blocks=12)
    assert first == Placement("d1", ("p2", "p1"))  # most headroom; load p1 3, p2 2
    assert (registry.outstanding_blocks("d1"), registry.incr_inflight("p2", 0)) == (12, 1)
    assert registry.incr_inflight("p2", 4) == 5  # routed since the last heartbeat: score max(2, 5)
    assert registry.place("prefill", decode_blocks=12) == Placement("d2", ("p1", "p2"))  # d1 18, d2 20
    assert registry.place("prefill", max_prompt_workers=1) == Placement(None, ("p1",))  # no decode asked
    assert registry.incr_inflight("p1", 0) == 2
    # nothing fits: nothing is taken, and `missing` says why
    assert registry.place("prefill", decode_blocks=19) == Placement(None, (), missing="decode")
    assert registry.place("colocated", decode_blocks=1) == Placement(None, (), missing="colocated")
    assert (registry.outstanding_blocks("d1"), registry.outstanding_blocks("d2")) == (12, 12)
    assert (registry.incr_inflight("p1", 0), registry.incr_inflight("p2", 0)) == (2, 5)
    # one call gives back both; committed blocks move into the published snapshot
    registry.release(decode="d1", decode_blocks=12, committed=True, inflight="p2")
    registry.release(decode="d2", decode_blocks=12, inflight="p1")
    registry.release(inflight="p1")
    registry.release()  # nothing held: no call
    assert [registry.outstanding_blocks(w) for w in ("d1", "d2")] == [0, 0]
    assert (registry.incr_inflight("p1", 0), registry.incr_inflight("p2", 0)) == (0, 4)
    assert [ld.free_kv_blocks for _, ld in registry.list_workers("decode")] == [18, 20]
    with pytest.raises(ValueError, match="rule"):
        registry.place("prefill", "random")
    with pytest.raises(ValueError, match="decode_blocks"):
        registry.place("prefill", decode_blocks=-1)


def test_place_rules(registry: Registry) -> None:
    for wid in ("p1", "p2", "p3"):
        registry.register(info(wid, role="prefill"), 10)
    rr = [registry.place("prefill", "round_robin", max_prompt_workers=3).prompt for _ in range(4)]
    assert rr == [("p1", "p2", "p3"), ("p2", "p3", "p1"), ("p3", "p1", "p2"), ("p1", "p2", "p3")]
    other = Registry(registry.redis, registry.cluster)  # another router: the same rotation
    assert other.place("prefill", "round_robin").prompt == ("p2", "p3")
    for wid, n in (("p1", 2), ("p2", 2), ("p3", 1)):
        registry.decr_inflight(wid, n)
    # prefix_aware: the hashes are noted on the chosen worker at placement
    first = registry.place("prefill", "prefix_aware", block_hashes=["a", "b"], load_slack=2)
    assert first == Placement(None, ("p1", "p2"), 0)  # nothing cached yet: least loaded
    assert registry.best_prefix_worker(["a", "b", "c"], role="prefill") == ("p1", 2)
    again = registry.place("prefill", "prefix_aware", block_hashes=["a", "x"], load_slack=2)
    assert again == Placement(None, ("p1", "p2"), 1)  # p1 holds "a", its load 1 <= 0 + 2
    registry.heartbeat("p1", WorkerLoad(3, 0, 10, 0), 10)  # p1's score 3 > 0 + slack
    assert registry.place("prefill", "prefix_aware", block_hashes=["a", "b"], load_slack=2).prompt == ("p2", "p3")
    assert registry.best_prefix_worker(["a", "b"], role="prefill") == ("p2", 2)  # noted on p2 now, less loaded
    assert registry.place("prefill", "least_loaded", block_hashes=["z"]).prompt == ("p3", "p2")  # no note
    assert registry.best_prefix_worker(["z"]) == (None, 0)


def test_place_concurrent_never_overcommits(redis_server: RedisServer) -> None:
    cluster, free = unique_cluster(), {"d1": 50, "d2": 23}

    async def main() -> list[Placement]:
        reg = AsyncRegistry(redis_server.url, cluster, max_connections=8)
        for wid, cap in free.items():
            await reg.register(info(wid, blocks=cap), 10)
        await reg.register(info("p1", role="prefill"), 10)
        got = await asyncio.gather(*(reg.place("prefill", decode_blocks=3) for _ in range(40)))
        await reg.aclose()
        return got

    got = asyncio.run(main())
    reg = Registry(redis_server.url, cluster)
    taken = [p for p in got if not p.missing]
    assert len(taken) == 16 + 7 and all(p.missing == "decode" for p in got if p not in taken)
    assert reg.incr_inflight("p1", 0) == len(taken)
    _check_no_overcommit(reg, [(p.decode, 3) for p in taken if p.decode], free)


def test_reserve_excludes_tried_workers(registry: Registry) -> None:
    registry.register(info("d1", blocks=100), 10)
    registry.register(info("d2", blocks=60), 10)
    assert registry.reserve_decode(10, exclude=["d1"]) == "d2"
    assert registry.reserve_decode(10, exclude=["d1", "d2"]) is None
    assert registry.reserve_decode(10, worker_id="d1", exclude=["d1"]) is None


# --- connections: one bounded pool per registry ----------------------------------------------------------


def test_async_registry_queues_for_connections_under_a_low_maxclients() -> None:
    """2,048 concurrent operations through one AsyncRegistry, on a server that accepts 64 clients: all
    succeed, on at most the pool's connections; an unbounded client fails the same load."""
    with RedisServer(extra_args=("--maxclients", "64")) as srv:
        cluster = unique_cluster()

        async def main() -> None:
            reg = AsyncRegistry(srv.url, cluster)
            await reg.register(info("d1", blocks=10_000), 10)
            await reg.register(info("p1", role="prefill"), 10)
            got = await asyncio.gather(*(reg.place("prefill", decode_blocks=1) for _ in range(2048)))
            assert all(p == Placement("d1", ("p1",)) for p in got)
            pool = reg.redis.connection_pool
            assert len(pool._available_connections) + len(pool._in_use_connections) <= pool.max_connections == 50
            await asyncio.gather(*(reg.release(decode="d1", decode_blocks=1, committed=False, inflight="p1")
                                   for _ in range(2048)))
            assert await reg.outstanding_blocks("d1") == await reg.incr_inflight("p1", 0) == 0
            await reg.aclose()

            unbounded = redis.asyncio.Redis.from_url(srv.url)  # redis-py's default pool: no queueing
            replies = await asyncio.gather(*(unbounded.get("k") for _ in range(2048)), return_exceptions=True)
            assert any(isinstance(r, redis.exceptions.ConnectionError) for r in replies)
            await unbounded.aclose()

        asyncio.run(main())


def test_registry_pool_is_bounded_and_configurable_by_url() -> None:
    with RedisServer(extra_args=("--maxclients", "8")) as srv:
        reg = Registry(srv.url + "?max_connections=4&timeout=5", unique_cluster())
        assert reg.redis.connection_pool.max_connections == 4
        reg.register(info("d1", blocks=10_000), 10)
        with ThreadPoolExecutor(32) as pool:
            got = list(pool.map(lambda _: reg.reserve_decode(1), range(512)))
        assert got == ["d1"] * 512 and reg.outstanding_blocks("d1") == 512
        reg.close()


def test_prefix_lookup(registry: Registry) -> None:
    for wid in ("p1", "p2", "p3", "p4"):
        registry.register(info(wid, role="prefill"), 10)
    registry.record_prefixes("p1", ["a", "b", "c"], ttl_s=10)
    registry.record_prefixes("p2", ["a", "b"], ttl_s=10)
    registry.record_prefixes("p3", ["x"], ttl_s=10)
    registry.record_prefixes("p4", ["b", "c"], ttl_s=10)  # not a leading run: never credited
    assert registry.best_prefix_worker(["a", "b", "c", "d"]) == ("p1", 3)
    assert registry.best_prefix_worker(["x", "a"]) == ("p3", 1)
    assert registry.best_prefix_worker(["z"]) == (None, 0)
    assert registry.best_prefix_worker([]) == (None, 0)
    assert registry.best_prefix_worker(["a", "b"]) == ("p1", 2)  # tie p1/p2, same load -> smaller id
    registry.heartbeat("p1", WorkerLoad(5, 0, 10, 0), 10)
    assert registry.best_prefix_worker(["a", "b"]) == ("p2", 2)  # tie -> less loaded
    assert registry.best_prefix_worker(["a", "b"], role="decode") == (None, 0)
    registry.deregister("p1")  # dead workers' records are ignored
    assert registry.best_prefix_worker(["a", "b", "c"]) == ("p2", 2)
    registry.record_prefixes("p3", ["y"], ttl_s=0.5)
    assert registry.best_prefix_worker(["y"]) == ("p3", 1)
    time.sleep(0.7)
    assert registry.best_prefix_worker(["y"]) == (None, 0)


# --- async API -----------------------------------------------------------------------------------------


def test_async_api(redis_server: RedisServer) -> None:
    cluster = unique_cluster()

    async def main() -> None:
        reg = AsyncRegistry(redis_server.url, cluster)
        await reg.register(info("d1", blocks=20), 10)
        await reg.register(info("p1", role="prefill"), 10)
        assert await reg.heartbeat("d1", WorkerLoad(0, 1, 20, 0), 10)
        assert [w.worker_id for w, _ in await reg.list_workers("decode")] == ["d1"]
        picks = await asyncio.gather(*(reg.reserve_decode(3) for _ in range(10)))
        assert picks.count("d1") == 6 and picks.count(None) == 4  # 6 * 3 <= 20 < 7 * 3
        assert await reg.outstanding_blocks("d1") == 18
        assert await reg.release_decode("d1", 18) == 0
        assert await reg.incr_inflight("p1") == 1 and await reg.decr_inflight("p1") == 0
        placed = await reg.place("prefill", decode_blocks=2)
        assert placed == Placement("d1", ("p1",)) and await reg.outstanding_blocks("d1") == 2
        await reg.release(decode="d1", decode_blocks=2, inflight="p1")
        assert await reg.outstanding_blocks("d1") == await reg.incr_inflight("p1", 0) == 0
        assert await reg.record_prefixes("p1", ["h0", "h1"], 10) == 2
        assert await reg.best_prefix_worker(["h0", "h1", "h2"]) == ("p1", 2)
        assert await reg.deregister("p1")
        await reg.aclose()

    asyncio.run(main())
    assert [w.worker_id for w, _ in Registry(redis_server.url, cluster).list_workers()] == ["d1"]


# --- the router's registry work per request ------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer-only model directory (words w3..w49) for the routers below; named apart from
    test_sdk_router's, whose name that module checks."""
    d = tmp_path_factory.mktemp("registry-model")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 50)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return d


class _Colocated(FakeWorker):
    """A scripted colocated worker: Generate sends tokens 4 and 5, one per step."""

    def Generate(self, req: wpb.WorkerGenerateRequest, ctx: grpc.ServicerContext) -> wpb.WorkerGenerateReply:
        self.run(req.router_id, req.request_id, [wpb.RequestOutput(token_ids=[4], text=" w4"),
                                                 wpb.RequestOutput(token_ids=[5], text=" w5", finish_reason="length")])
        return wpb.WorkerGenerateReply()


@pytest.mark.parametrize(("mode", "policy"), [
    ("disaggregated", "least_loaded"), ("disaggregated", "round_robin"), ("disaggregated", "prefix_aware"),
    ("colocated", "least_loaded"), ("colocated", "prefix_aware"),
])
def test_a_request_costs_the_router_two_registry_calls(make_cluster, monkeypatch, mode, policy):  # noqa: F811
    """One `place` and one `release` per request, in both modes and with every policy; the worker listing
    is read by the health loop (every 0.1 s here), never per request."""
    c = make_cluster(mode=mode, policy=policy)
    if mode == "colocated":
        c.workers += [w := _Colocated("colocated")]
        c.registry.register(WorkerInfo("c0", "colocated", f"127.0.0.1:{w.port}", "tiny", "none", "", 100,
                                       BLOCK), ttl_s=60)
    else:
        for wid, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode")):
            c.add(wid, role)
    c.client.wait_until_serving(timeout=5)
    reg, calls = c.router.orchestrator.registry, []
    real = reg._run

    async def counted(call):  # type: ignore[no-untyped-def]
        calls.append(call[0])
        return await real(call)

    monkeypatch.setattr(reg, "_run", counted)
    t0, n = time.monotonic(), 20
    for i in range(n):
        assert c.client.generate(list(range(3, 12)) + [i % 5 + 3], max_tokens=2).finish_reason == "length"
    elapsed = time.monotonic() - t0
    monkeypatch.undo()
    assert [x for x in calls if x != "list"] == ["place", "release"] * n
    assert calls.count("list") <= elapsed / 0.1 + 2  # the health loop's refreshes only
    ids = ("c0",) if mode == "colocated" else ("p0", "p1", "d0")
    assert not any(c.registry.outstanding_blocks(w) or c.registry.incr_inflight(w, 0) for w in ids)


def test_router_serves_a_thousand_concurrent_requests_on_a_low_maxclients(model_dir: Path) -> None:
    """1,024 requests at once through one router, whose Redis accepts 64 clients: every one succeeds (the
    router's registry queues for its pool's connections instead of opening one per request)."""
    with RedisServer(extra_args=("--maxclients", "64")) as srv:
        c = Cluster(srv.url, model_dir)
        try:
            c.add("p0", "prefill")
            c.add("d0", "decode", free_blocks=1_000_000)  # a fake never heartbeats: committed blocks stay used
            c.client.wait_until_serving(timeout=5)

            async def main() -> list[object]:
                async with pdserve.AsyncClient(c.router.address, timeout=120) as ac:
                    return await asyncio.gather(*(ac.generate([3, 4, 5], max_tokens=2) for _ in range(1024)),
                                                return_exceptions=True)

            results = asyncio.run(main())
            errors = [r for r in results if isinstance(r, BaseException)]
            assert not errors, errors[:3]
            assert c.registry.outstanding_blocks("d0") == c.registry.incr_inflight("p0", 0) == 0
        finally:
            c.close()
