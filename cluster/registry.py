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

# --- Lua: KEYS[1] = the workers set (routes the call to the right node), ARGV[1] = key prefix -----------
_PRELUDE = """
local P = ARGV[1]
local function wkey(id) return P .. 'w:' .. id end
local function num(v) return tonumber(v) or 0 end
local function now_ms() local t = redis.call('TIME') return t[1] * 1000 + math.floor(t[2] / 1000) end
local function members(role)
  local ids = {}
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    local r = redis.call('HGET', wkey(id), 'role')
    if not r then redis.call('SREM', KEYS[1], id)
    elseif role == '' or r == role then ids[#ids + 1] = id end
  end
  table.sort(ids)
  return ids
end
local function score(id)
  local f = redis.call('HMGET', wkey(id), 'num_waiting', 'num_running')
  return math.max(num(f[1]) + num(f[2]), num(redis.call('GET', wkey(id) .. ':inflight')))
end
local function least_loaded(ids)
  local best, bs = false, nil
  for _, id in ipairs(ids) do
    local s = score(id)
    if bs == nil or s < bs then best, bs = id, s end
  end
  return best
end
"""
_LUA = {
    # ARGV: P, id, ttl_ms, is_register ('1'/'0'), field, value, ...; heartbeat: 0 if the worker expired
    "upsert": """
local k = wkey(ARGV[2])
if ARGV[4] == '1' then redis.call('DEL', k, k .. ':outstanding', k .. ':inflight')
elseif redis.call('EXISTS', k) == 0 then return 0 end
redis.call('HSET', k, unpack(ARGV, 5))
redis.call('PEXPIRE', k, ARGV[3])
redis.call('SADD', KEYS[1], ARGV[2])
return 1""",
    # ARGV: P, id
    "deregister": """
local k = wkey(ARGV[2])
redis.call('SREM', KEYS[1], ARGV[2])
return redis.call('DEL', k, k .. ':outstanding', k .. ':inflight') > 0 and 1 or 0""",
    # ARGV: P, role ('' = any)
    "list": """
local out = {}
for _, id in ipairs(members(ARGV[2])) do out[#out + 1] = redis.call('HGETALL', wkey(id)) end
return out""",
    # ARGV: P, num_blocks, worker_id ('' = any), role, counter_ttl_ms
    "reserve": """
local n = tonumber(ARGV[2])
local ids = ARGV[3] ~= '' and {ARGV[3]} or members(ARGV[4])
local best, room_best = false, -1
for _, id in ipairs(ids) do
  local free = redis.call('HGET', wkey(id), 'free_kv_blocks')
  if free then
    local room = tonumber(free) - num(redis.call('GET', wkey(id) .. ':outstanding'))
    if room >= n and room > room_best then best, room_best = id, room end
  end
end
if best then
  redis.call('INCRBY', wkey(best) .. ':outstanding', n)
  redis.call('PEXPIRE', wkey(best) .. ':outstanding', ARGV[5])
end
return best""",
    # ARGV: P, id, num_blocks, committed ('1'/'0')
    "release": """
local k, n = wkey(ARGV[2]), tonumber(ARGV[3])
local left = math.max(num(redis.call('GET', k .. ':outstanding')) - n, 0)
if left == 0 then redis.call('DEL', k .. ':outstanding')
else redis.call('SET', k .. ':outstanding', left, 'KEEPTTL') end
if ARGV[4] == '1' and redis.call('EXISTS', k) == 1 then
  redis.call('HSET', k, 'free_kv_blocks', math.max(num(redis.call('HGET', k, 'free_kv_blocks')) - n, 0))
  redis.call('HINCRBY', k, 'reserved_kv_blocks', n)
end
return left""",
    # ARGV: P, id, counter name, delta (0 = read), ttl_ms
    "counter": """
local c = wkey(ARGV[2]) .. ':' .. ARGV[3]
local d = tonumber(ARGV[4])
if d == 0 then return num(redis.call('GET', c)) end
local v = math.max(num(redis.call('GET', c)) + d, 0)
if v == 0 then redis.call('DEL', c) else redis.call('SET', c, v, 'PX', ARGV[5]) end
return v""",
    # ARGV: P, role
    "pick_prefill": "return least_loaded(members(ARGV[2]))",
    # ARGV: P, id, ttl_ms, hash, ...
    "record_prefixes": """
local now, ttl = now_ms(), tonumber(ARGV[3])
for i = 4, #ARGV do
  local k = P .. 'px:' .. ARGV[i]
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  redis.call('ZADD', k, now + ttl, ARGV[2])
  if redis.call('PTTL', k) < ttl then redis.call('PEXPIRE', k, ttl) end
end
return #ARGV - 3""",
    # ARGV: P, role ('' = any), hash, ...
    "best_prefix": """
local now, cand, ids, len, ok = now_ms(), nil, {}, 0, {}
for i = 3, #ARGV do
  local nxt, nids = {}, {}
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'px:' .. ARGV[i], '(' .. now, '+inf')) do
    if cand == nil or cand[id] then
      if ok[id] == nil then
        local r = redis.call('HGET', wkey(id), 'role')
        ok[id] = (r and (ARGV[2] == '' or r == ARGV[2])) and true or false
      end
      if ok[id] then nxt[id] = true; nids[#nids + 1] = id end
    end
  end
  if #nids == 0 then break end
  cand, ids, len = nxt, nids, i - 2
end
if len == 0 then return {'', 0} end
table.sort(ids)
return {least_loaded(ids), len}""",
}
_SCRIPTS = {name: _PRELUDE + body for name, body in _LUA.items()}


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
        self._scripts = {name: client.register_script(src) for name, src in _SCRIPTS.items()}

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
