"""The Registry against a real redis-server (no mocks); the RedisServer process itself: test_redis_server."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import threading
import time

import pytest

from cluster.redis_server import RedisServer
from cluster.registry import AsyncRegistry, Registry, WorkerInfo, WorkerLoad
from tests import redis_fixtures
from tests.redis_fixtures import unique_cluster

# the shared fixtures (also fine once tests/conftest.py imports them: same objects)
redis_server = redis_fixtures.redis_server
registry = redis_fixtures.registry


def info(worker_id: str, role: str = "decode", blocks: int = 100) -> WorkerInfo:
    return WorkerInfo(worker_id, role, f"{worker_id}:5000", "tiny", "grpc", "", "host0", blocks, 16)


# --- registration, listing, liveness ---------------------------------------------------------------


def test_register_and_list(registry: Registry) -> None:
    registry.register(info("d2", blocks=50), ttl_s=10)
    registry.register(info("d1"), ttl_s=10, load=WorkerLoad(1, 2, 80, 5))
    registry.register(WorkerInfo("p1", "prefill", "h:1", "tiny", "nccl", "h:29500", "host1", 10, 16), 10)
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


def test_pick_prefill_least_loaded(registry: Registry) -> None:
    assert registry.pick_prefill_least_loaded() is None
    for wid in ("p1", "p2"):
        registry.register(info(wid, role="prefill"), 10)
    registry.register(info("d1"), 10)
    registry.heartbeat("p1", WorkerLoad(2, 1, 10, 0), 10)
    registry.heartbeat("p2", WorkerLoad(0, 2, 10, 0), 10)
    assert registry.pick_prefill_least_loaded() == "p2"
    assert registry.incr_inflight("p2", 4) == 4  # routed since the last heartbeat: score max(2, 4)
    assert registry.pick_prefill_least_loaded() == "p1"
    assert registry.decr_inflight("p2", 10) == 0  # floor 0
    assert registry.pick_prefill_least_loaded() == "p2"
    assert registry.pick_prefill_least_loaded(role="decode") == "d1"


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
        assert await reg.pick_prefill_least_loaded() == "p1"
        assert await reg.record_prefixes("p1", ["h0", "h1"], 10) == 2
        assert await reg.best_prefix_worker(["h0", "h1", "h2"]) == ("p1", 2)
        assert await reg.deregister("p1")
        await reg.aclose()

    asyncio.run(main())
    assert [w.worker_id for w, _ in Registry(redis_server.url, cluster).list_workers()] == ["d1"]
