"""Worker registry, live load and router-side reservations in Redis (torch-free; the router imports it).

Key layout (all under one hash tag, so every key lives in one Redis Cluster slot and Lua may touch any):

    {pdserve}:<cluster>:workers               SET    ids of registered workers (dead ones pruned lazily)
    {pdserve}:<cluster>:w:<id>                HASH   WorkerInfo + WorkerLoad fields; PX = heartbeat TTL
    {pdserve}:<cluster>:w:<id>:outstanding    STRING router-side decode blocks picked but not yet released
    {pdserve}:<cluster>:w:<id>:inflight       STRING router-side prefill requests dispatched, not finished
    {pdserve}:<cluster>:px:<block hash>       ZSET   worker id -> expiry time (ms, Redis clock)

A worker is live while its hash exists: `register` creates it, `heartbeat` refreshes load and expiry.

Decode reservations. The worker's published `free_kv_blocks` already excludes blocks it has allocated or
reserved itself. The `outstanding` counter covers the window between a router's pick and the worker's own
reservation: `reserve_decode` picks the live worker with the most headroom (free_kv_blocks - outstanding)
that fits and adds the blocks to its counter, atomically, so concurrent routers never over-commit.
Once the worker's reserve RPC has returned, the router calls `release_decode` (in `finally`): it subtracts
the blocks (never below 0) and, with `committed=True` (the worker accepted), moves them into the published
snapshot (free -= n, reserved += n) so they stay counted until the worker's next heartbeat, whose load
already includes them (a heartbeat landing between the two counts them twice until the next one: safe).
The counter expires `counter_ttl_s` after the last reservation, so a crashed router cannot leak headroom.

Prefill placement: load score = max(num_waiting + num_running, inflight); the heartbeat is authoritative
but stale, `inflight` is fresh between heartbeats, and max() avoids counting a request twice.
Prefix policy: block hashes are chained (hash i covers blocks 0..i), so a worker can reuse the longest
leading run of the request's hashes that it holds; `best_prefix_worker` returns the live worker with the
longest such run (ties: lower load score, then smaller id) and the run length in blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import redis
import redis.asyncio

from cluster.registry_lua import SCRIPTS

ROLES = ("prefill", "decode", "colocated")


@dataclass(frozen=True)
class WorkerInfo:
    """Static description of a worker, written at registration."""

    worker_id: str
    role: str  # "prefill" | "decode" | "colocated"
    address: str  # host:port of the worker's internal gRPC service
    model: str
    transport: str  # KV transport it speaks: "nccl", "gloo", "cuda_ipc", "grpc"
    transport_endpoint: str  # opaque string the transport publishes; may be ""
    host_id: str  # physical host, for same-host transports
    total_kv_blocks: int
    block_size: int

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ValueError("worker_id must be non-empty")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.total_kv_blocks < 0 or self.block_size < 1:
            raise ValueError("total_kv_blocks must be >= 0 and block_size >= 1")


@dataclass(frozen=True)
class WorkerLoad:
    """Live load, published by the worker with each heartbeat."""

    num_waiting: int
    num_running: int
    free_kv_blocks: int
    reserved_kv_blocks: int = 0  # blocks the worker promised to routers but has not filled yet


_INFO = tuple(f.name for f in fields(WorkerInfo))
_LOAD = tuple(f.name for f in fields(WorkerLoad))
_INT = {f.name for f in (*fields(WorkerInfo), *fields(WorkerLoad)) if f.type == "int"}


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _opt(v: Any) -> str | None:
    return None if v is None or v in ("", b"") else _str(v)


def _ms(seconds: float) -> int:
    if seconds <= 0:
        raise ValueError(f"a TTL must be positive, got {seconds}")
    return max(1, int(seconds * 1000))


def _parse_worker(flat: Sequence[Any]) -> tuple[WorkerInfo, WorkerLoad]:
    h = {_str(flat[i]): _str(flat[i + 1]) for i in range(0, len(flat), 2)}
    v = {k: (int(x) if k in _INT else x) for k, x in h.items()}
    return WorkerInfo(**{k: v[k] for k in _INFO}), WorkerLoad(**{k: v.get(k, 0) for k in _LOAD})


_Call = tuple[str, list[Any], Callable[[Any], Any]]  # script name, ARGV, reply parser


class _Base:
    """Key naming, argument building and script registration, shared by the sync and async registries."""

    def __init__(self, client: Any, cluster: str, counter_ttl_s: float) -> None:
        if not cluster or "{" in cluster or "}" in cluster:
            raise ValueError(f"cluster name must be non-empty and free of braces, got {cluster!r}")
        self.redis, self.cluster = client, cluster
        self.prefix = f"{{pdserve}}:{cluster}:"
        self._members = self.prefix + "workers"
        self._counter_ttl_ms = _ms(counter_ttl_s)
        self._scripts = {name: client.register_script(src) for name, src in SCRIPTS.items()}

    def _call(self, script: str, *args: Any, parse: Callable[[Any], Any] = int) -> _Call:
        return script, [self.prefix, *args], parse

    def _register(self, info: WorkerInfo, ttl_s: float, load: WorkerLoad | None) -> _Call:
        load = load or WorkerLoad(0, 0, info.total_kv_blocks, 0)
        pairs = [x for kv in (asdict(info) | asdict(load)).items() for x in kv]
        return self._call("upsert", info.worker_id, _ms(ttl_s), "1", *pairs, parse=lambda r: None)

    def _heartbeat(self, worker_id: str, load: WorkerLoad, ttl_s: float) -> _Call:
        pairs = [x for kv in asdict(load).items() for x in kv]
        return self._call("upsert", worker_id, _ms(ttl_s), "0", *pairs, parse=lambda r: bool(int(r)))

    def _reserve(self, num_blocks: int, worker_id: str | None, role: str) -> _Call:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        return self._call("reserve", num_blocks, worker_id or "", role, self._counter_ttl_ms, parse=_opt)

    def _release(self, worker_id: str, num_blocks: int, committed: bool) -> _Call:
        return self._call("release", worker_id, max(0, num_blocks), "1" if committed else "0")

    def _counter(self, worker_id: str, name: str, delta: int) -> _Call:
        return self._call("counter", worker_id, name, delta, self._counter_ttl_ms)

    def _best_prefix(self, hashes: Sequence[str], role: str | None) -> _Call:
        return self._call("best_prefix", role or "", *hashes, parse=lambda r: (_opt(r[0]), int(r[1])))

    def _list(self, role: str | None) -> _Call:
        return self._call("list", role or "", parse=lambda r: [_parse_worker(h) for h in r])


class Registry(_Base):
    """Synchronous registry (workers, tests, CLI). `client` is a redis URL or a `redis.Redis`."""

    def __init__(self, client: str | redis.Redis, cluster: str = "default", *, counter_ttl_s: float = 60.0):
        if isinstance(client, str):
            client = redis.Redis.from_url(client, decode_responses=True)
        super().__init__(client, cluster, counter_ttl_s)

    def _run(self, c: _Call) -> Any:
        return c[2](self._scripts[c[0]](keys=[self._members], args=c[1]))

    def register(self, info: WorkerInfo, ttl_s: float, load: WorkerLoad | None = None) -> None:
        """(Re)register a worker, live for `ttl_s`; initial load defaults to idle with all blocks free."""
        self._run(self._register(info, ttl_s, load))

    def heartbeat(self, worker_id: str, load: WorkerLoad, ttl_s: float) -> bool:
        """Publish load and extend liveness; False if the worker had expired (it should re-register)."""
        return self._run(self._heartbeat(worker_id, load, ttl_s))

    def deregister(self, worker_id: str) -> bool:
        """Remove a worker and its router-side counters; True if it was registered."""
        return bool(self._run(self._call("deregister", worker_id)))

    def list_workers(self, role: str | None = None) -> list[tuple[WorkerInfo, WorkerLoad]]:
        """Live workers (optionally of one role), sorted by worker_id."""
        return self._run(self._list(role))

    def reserve_decode(
        self, num_blocks: int, *, worker_id: str | None = None, role: str = "decode"
    ) -> str | None:
        """Atomically pick the live `role` worker (or the named one) with the most headroom that fits."""
        return self._run(self._reserve(num_blocks, worker_id, role))

    def release_decode(self, worker_id: str, num_blocks: int, *, committed: bool = False) -> int:
        """Undo a reservation (floor 0); `committed`: the worker accepted it. Returns what is left."""
        return self._run(self._release(worker_id, num_blocks, committed))

    def outstanding_blocks(self, worker_id: str) -> int:
        """Router-side decode blocks picked for `worker_id` and not yet released."""
        return self._run(self._counter(worker_id, "outstanding", 0))

    def incr_inflight(self, worker_id: str, n: int = 1) -> int:
        """Count `n` prefill requests dispatched to `worker_id`; returns the new count."""
        return self._run(self._counter(worker_id, "inflight", n))

    def decr_inflight(self, worker_id: str, n: int = 1) -> int:
        """Uncount `n` finished prefill requests (floor 0); returns the new count."""
        return self._run(self._counter(worker_id, "inflight", -n))

    def pick_prefill_least_loaded(self, role: str = "prefill") -> str | None:
        """The live `role` worker with the lowest max(num_waiting + num_running, inflight)."""
        return self._run(self._call("pick_prefill", role, parse=_opt))

    def record_prefixes(self, worker_id: str, hashes: Sequence[str], ttl_s: float) -> int:
        """Note that `worker_id` caches these block hashes, for `ttl_s`; returns how many."""
        return self._run(self._call("record_prefixes", worker_id, _ms(ttl_s), *hashes)) if hashes else 0

    def best_prefix_worker(self, hashes: Sequence[str], role: str | None = None) -> tuple[str | None, int]:
        """The live worker holding the longest leading run of `hashes`, and its length (None, 0 if none)."""
        return self._run(self._best_prefix(hashes, role)) if hashes else (None, 0)

    def close(self) -> None:
        self.redis.close()


class AsyncRegistry(_Base):
    """The same API as `Registry`, with coroutines, over `redis.asyncio` (for the grpc.aio router)."""

    def __init__(
        self, client: str | redis.asyncio.Redis, cluster: str = "default", *, counter_ttl_s: float = 60.0
    ):
        if isinstance(client, str):
            client = redis.asyncio.Redis.from_url(client, decode_responses=True)
        super().__init__(client, cluster, counter_ttl_s)

    async def _run(self, c: _Call) -> Any:
        return c[2](await self._scripts[c[0]](keys=[self._members], args=c[1]))

    async def register(self, info: WorkerInfo, ttl_s: float, load: WorkerLoad | None = None) -> None:
        await self._run(self._register(info, ttl_s, load))

    async def heartbeat(self, worker_id: str, load: WorkerLoad, ttl_s: float) -> bool:
        return await self._run(self._heartbeat(worker_id, load, ttl_s))

    async def deregister(self, worker_id: str) -> bool:
        return bool(await self._run(self._call("deregister", worker_id)))

    async def list_workers(self, role: str | None = None) -> list[tuple[WorkerInfo, WorkerLoad]]:
        return await self._run(self._list(role))

    async def reserve_decode(
        self, num_blocks: int, *, worker_id: str | None = None, role: str = "decode"
    ) -> str | None:
        return await self._run(self._reserve(num_blocks, worker_id, role))

    async def release_decode(self, worker_id: str, num_blocks: int, *, committed: bool = False) -> int:
        return await self._run(self._release(worker_id, num_blocks, committed))

    async def outstanding_blocks(self, worker_id: str) -> int:
        return await self._run(self._counter(worker_id, "outstanding", 0))

    async def incr_inflight(self, worker_id: str, n: int = 1) -> int:
        return await self._run(self._counter(worker_id, "inflight", n))

    async def decr_inflight(self, worker_id: str, n: int = 1) -> int:
        return await self._run(self._counter(worker_id, "inflight", -n))

    async def pick_prefill_least_loaded(self, role: str = "prefill") -> str | None:
        return await self._run(self._call("pick_prefill", role, parse=_opt))

    async def record_prefixes(self, worker_id: str, hashes: Sequence[str], ttl_s: float) -> int:
        return await self._run(self._call("record_prefixes", worker_id, _ms(ttl_s), *hashes)) if hashes else 0

    async def best_prefix_worker(
        self, hashes: Sequence[str], role: str | None = None
    ) -> tuple[str | None, int]:
        return await self._run(self._best_prefix(hashes, role)) if hashes else (None, 0)

    async def aclose(self) -> None:
        await self.redis.aclose()
