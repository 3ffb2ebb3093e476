"""Worker registry, live load and router-side placement in Redis (torch-free; the router imports it).

Key layout (all under one hash tag, so every key lives in one Redis Cluster slot and Lua may touch any):

    {pdserve}:<cluster>:workers               SET    ids of registered workers (dead ones pruned lazily)
    {pdserve}:<cluster>:w:<id>                HASH   WorkerInfo + WorkerLoad fields; PX = heartbeat TTL
    {pdserve}:<cluster>:w:<id>:outstanding    STRING router-side decode blocks picked but not yet released
    {pdserve}:<cluster>:w:<id>:inflight       STRING router-side prompt requests dispatched, not finished
    {pdserve}:<cluster>:rr:<role>             STRING round_robin's position among the role's workers
    {pdserve}:<cluster>:px:<block hash>       ZSET   worker id -> expiry time (ms, Redis clock)

A worker is live while its hash exists: `register` creates it, `heartbeat` refreshes load and expiry.
With the cluster secret (`secret=`), `register` signs the worker's static info (field `sig`,
`cluster.secret.sign_fields`) and `list_workers` leaves out every entry whose signature does not verify:
the router never sends work to a worker the cluster did not register, whoever could write to Redis.

One request costs the router two round trips on its normal path, each one Lua call, so the registry's
state only ever moves atomically and concurrent routers never over-commit:
- `place` picks the decode worker with the most headroom (free_kv_blocks - outstanding) that fits and
  adds the request's blocks to its `outstanding` counter, orders the prompt workers (prefill, or
  colocated) by the policy's rule and counts the first one's `inflight`, and (prefix_aware) notes the
  prompt's block hashes as cached there. It takes all of that, or nothing.
- `release` at the end undoes both: it subtracts the blocks from `outstanding` (never below 0) and, with
  `committed` (the decode worker accepted the reservation), moves them into the published snapshot
  (free -= n, reserved += n) so they stay counted until the worker's next heartbeat, whose load already
  includes them; and it decrements `inflight`.
A retry after a refusal (`reserve_decode` with the tried workers excluded, `incr_inflight` on the next
prompt worker) costs more round trips: that is the exceptional path.

Decode reservations. The worker's published `free_kv_blocks` already excludes blocks it has allocated or
reserved itself; `outstanding` covers the router's side from the pick until `release`. A heartbeat that
lands in between (the worker has reserved, the router has not released yet) counts those blocks twice
until `release` or the next heartbeat: conservative, never an over-commit. The counters expire
`counter_ttl_s` after their last change, so a crashed router cannot leak headroom or load.

Prompt placement, by rule: `least_loaded` orders by load score = max(num_waiting + num_running, inflight)
(the heartbeat is authoritative but stale, `inflight` is fresh between heartbeats, and max() avoids
counting a request twice), ties by worker id; `round_robin` rotates over the live workers (one position
per cluster, shared by every router); `prefix_aware` puts first the worker holding the longest leading
run of the prompt's block hashes (hashes are chained: hash i covers blocks 0..i; ties: lower score, then
smaller id) unless its score exceeds the least loaded one's by more than `load_slack`, the rest least
loaded. The hashes are noted at placement, not after the prefill, so a burst sharing a prefix lands on one
worker (as SGLang's cache-aware router inserts at routing time).

Connections. Built from a URL, a registry owns one bounded, blocking connection pool: callers queue for
one of `max_connections` connections (up to `pool_timeout_s`, then a `redis.ConnectionError`) instead of
opening more, so no load opens more connections than that. A process makes one registry and shares it
(the router does). The URL's `?max_connections=N&timeout=S` override the two defaults. A `rediss://` URL
speaks TLS (redis-py's own; e.g. `?ssl_ca_certs=/path/ca.crt` names the CA that signed the server's
certificate). A password kept apart from the URL (the Helm chart's, from a Secret, in `PASSWORD_ENV`) goes
into it with `url_with_password`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import redis
import redis.asyncio

from cluster import env
from cluster.registry_lua import SCRIPTS
from cluster.secret import same, sign_fields
from cluster.worker.config import ROLES
from router.config import POLICIES as RULES

PASSWORD_ENV = env.REDIS_PASSWORD  # the launcher puts it into a given redis_url


def url_with_password(url: str, password: str) -> str:
    """`url` carrying `password` (URL-quoted; any password it had is replaced, its user name kept)."""
    parts = urlsplit(url)
    user = quote(parts.username or "", safe="")
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"))


@dataclass(frozen=True)
class WorkerInfo:
    """Static description of a worker, written at registration."""

    worker_id: str
    role: str  # "prefill" | "decode" | "colocated"
    address: str  # host:port of the worker's internal gRPC service
    model: str
    transport: str  # KV transport it speaks: "nccl", "gloo", "cuda_ipc", "grpc"
    transport_endpoint: str  # opaque string the transport publishes; may be ""
    total_kv_blocks: int
    block_size: int
    max_requests: int = 0  # requests it holds at once (running + its queue); 0: no bound known

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ValueError("worker_id must be non-empty")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.total_kv_blocks < 0 or self.block_size < 1 or self.max_requests < 0:
            raise ValueError("total_kv_blocks and max_requests must be >= 0 and block_size >= 1")


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


def _hash(flat: Sequence[Any]) -> dict[str, str]:
    return {_str(flat[i]): _str(flat[i + 1]) for i in range(0, len(flat), 2)}


def _parse_worker(flat: Sequence[Any]) -> tuple[WorkerInfo, WorkerLoad]:
    v = {k: (int(x) if k in _INT else x) for k, x in _hash(flat).items()}
    return WorkerInfo(**{k: v[k] for k in _INFO}), WorkerLoad(**{k: v.get(k, 0) for k in _LOAD})


def _signature(secret: str, info: WorkerInfo) -> str:
    return sign_fields(secret, {k: str(v) for k, v in asdict(info).items()})


def _signed(secret: str, flat: Sequence[Any]) -> bool:
    """Whether a listed entry's static fields carry a valid signature under `secret` (cluster.secret)."""
    h = _hash(flat)
    return all(k in h for k in _INFO) and same(h.get(SIG_FIELD, ""), sign_fields(secret, {k: h[k] for k in _INFO}))


SIG_FIELD = "sig"  # HMAC of a worker's static info under the cluster secret, written at register
MAX_CONNECTIONS = 50  # redis-py's BlockingConnectionPool defaults: pool size, and the wait for a connection
POOL_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Placement:
    """What one `place` call took: all of it, or nothing (then `missing` says why)."""

    decode: str | None  # decode worker whose `outstanding` counter holds the request's blocks
    prompt: tuple[str, ...]  # prompt workers in the order to try; the first one's `inflight` is counted
    prefix_blocks: int = 0  # prefix_aware: leading blocks of the prompt the first one was noted to cache
    missing: str = ""  # nothing was taken: "decode" (no decode worker has room) or the prompt role (none live)


def _placement(r: Sequence[Any]) -> Placement:
    missing, decode, matched, *order = r
    return Placement(_opt(decode), tuple(_str(x) for x in order), int(matched), _str(missing))


_Call = tuple[str, list[Any], Callable[[Any], Any]]  # script name, ARGV, reply parser


class _Base:
    """Key naming, argument building and script registration, shared by the sync and async registries."""

    def __init__(self, client: Any, cluster: str, counter_ttl_s: float, secret: str) -> None:
        if not cluster or "{" in cluster or "}" in cluster:
            raise ValueError(f"cluster name must be non-empty and free of braces, got {cluster!r}")
        self.redis, self.cluster, self._secret = client, cluster, secret
        self.prefix = f"{{pdserve}}:{cluster}:"
        self._members = self.prefix + "workers"
        self._counter_ttl_ms = _ms(counter_ttl_s)
        self._scripts = {name: client.register_script(src) for name, src in SCRIPTS.items()}

    def _call(self, script: str, *args: Any, parse: Callable[[Any], Any] = int) -> _Call:
        return script, [self.prefix, *args], parse

    def _register(self, info: WorkerInfo, ttl_s: float, load: WorkerLoad | None) -> _Call:
        load = load or WorkerLoad(0, 0, info.total_kv_blocks, 0)
        pairs = [x for kv in (asdict(info) | asdict(load)).items() for x in kv]
        if self._secret:
            pairs += [SIG_FIELD, _signature(self._secret, info)]
        return self._call("upsert", info.worker_id, _ms(ttl_s), "1", *pairs, parse=lambda r: None)

    def _heartbeat(self, worker_id: str, load: WorkerLoad, ttl_s: float) -> _Call:
        pairs = [x for kv in asdict(load).items() for x in kv]
        return self._call("upsert", worker_id, _ms(ttl_s), "0", *pairs, parse=lambda r: bool(int(r)))

    def _place(self, prompt_role: str, rule: str, decode_blocks: int | None, decode_role: str,
               block_hashes: Sequence[str], load_slack: int, prefix_ttl_s: float, max_prompt: int) -> _Call:
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if decode_blocks is not None and decode_blocks < 0:
            raise ValueError(f"decode_blocks must be >= 0, got {decode_blocks}")
        if max_prompt < 1 or load_slack < 0:
            raise ValueError("max_prompt_workers must be >= 1 and load_slack >= 0")
        hashes = block_hashes if rule == "prefix_aware" else ()
        return self._call("place", -1 if decode_blocks is None else decode_blocks, decode_role,
                          self._counter_ttl_ms, prompt_role, rule, max_prompt, load_slack, _ms(prefix_ttl_s),
                          *hashes, parse=_placement)

    def _release(self, decode: str | None, decode_blocks: int, committed: bool, inflight: str | None) -> _Call:
        return self._call("release", decode or "", max(0, decode_blocks), "1" if committed else "0",
                          inflight or "", self._counter_ttl_ms, parse=lambda r: None)

    def _reserve(self, num_blocks: int, worker_id: str | None, role: str, exclude: Sequence[str]) -> _Call:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        return self._call("reserve", num_blocks, worker_id or "", role, self._counter_ttl_ms, *exclude, parse=_opt)

    def _release_decode(self, worker_id: str, num_blocks: int, committed: bool) -> _Call:
        return self._call("release_decode", worker_id, max(0, num_blocks), "1" if committed else "0")

    def _counter(self, worker_id: str, name: str, delta: int) -> _Call:
        return self._call("counter", worker_id, name, delta, self._counter_ttl_ms)

    def _best_prefix(self, hashes: Sequence[str], role: str | None) -> _Call:
        return self._call("best_prefix", role or "", *hashes, parse=lambda r: (_opt(r[0]), int(r[1])))

    def _list(self, role: str | None) -> _Call:
        return self._call("list", role or "", parse=lambda r: [_parse_worker(h) for h in r if self._trusted(h)])

    def _trusted(self, flat: Sequence[Any]) -> bool:
        """With a secret, only entries it signed (what a cluster member wrote); without one, all."""
        return not self._secret or _signed(self._secret, flat)


class Registry(_Base):
    """Synchronous registry (workers, tests, CLI). `client`: a redis URL (then it owns a bounded pool, see
    the module's docstring) or a `redis.Redis` (used as it is)."""

    def __init__(self, client: str | redis.Redis, cluster: str = "default", *, counter_ttl_s: float = 60.0,
                 max_connections: int = MAX_CONNECTIONS, pool_timeout_s: float = POOL_TIMEOUT_S,
                 secret: str = "") -> None:
        if isinstance(client, str):
            client = redis.Redis.from_pool(redis.BlockingConnectionPool.from_url(
                client, max_connections=max_connections, timeout=pool_timeout_s, decode_responses=True))
        super().__init__(client, cluster, counter_ttl_s, secret)

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

    def place(self, prompt_role: str, rule: str = "least_loaded", *, decode_blocks: int | None = None,
              decode_role: str = "decode", block_hashes: Sequence[str] = (), load_slack: int = 0,
              prefix_ttl_s: float = 300.0, max_prompt_workers: int = 2) -> Placement:
        """One request's placement, atomically (see the module's docstring): with `decode_blocks`, the
        decode worker with the most headroom that fits, those blocks reserved; the live `prompt_role`
        workers in `rule`'s order (at most `max_prompt_workers`), the first one's inflight counted; with
        `prefix_aware`, `block_hashes` noted as cached on it for `prefix_ttl_s`. Undo with `release`."""
        return self._run(self._place(prompt_role, rule, decode_blocks, decode_role, block_hashes, load_slack,
                                     prefix_ttl_s, max_prompt_workers))

    def release(self, *, decode: str | None = None, decode_blocks: int = 0, committed: bool = False,
                inflight: str | None = None) -> None:
        """Give back in one call what `place` (or the retry calls) took: `decode_blocks` on `decode` (moved
        into its published snapshot if `committed`: the worker accepted them), one `inflight` count."""
        if decode or inflight:
            self._run(self._release(decode, decode_blocks, committed, inflight))

    def reserve_decode(self, num_blocks: int, *, worker_id: str | None = None, role: str = "decode",
                       exclude: Sequence[str] = ()) -> str | None:
        """Atomically pick the live `role` worker (or the named one), not in `exclude`, with the most
        headroom that fits, and reserve `num_blocks` on it."""
        return self._run(self._reserve(num_blocks, worker_id, role, exclude))

    def release_decode(self, worker_id: str, num_blocks: int, *, committed: bool = False) -> int:
        """Undo a reservation (floor 0); `committed`: the worker accepted it. Returns what is left."""
        return self._run(self._release_decode(worker_id, num_blocks, committed))

    def outstanding_blocks(self, worker_id: str) -> int:
        """Router-side decode blocks picked for `worker_id` and not yet released."""
        return self._run(self._counter(worker_id, "outstanding", 0))

    def incr_inflight(self, worker_id: str, n: int = 1) -> int:
        """Count `n` prompt requests dispatched to `worker_id` (0: read); returns the new count."""
        return self._run(self._counter(worker_id, "inflight", n))

    def decr_inflight(self, worker_id: str, n: int = 1) -> int:
        """Uncount `n` finished prompt requests (floor 0); returns the new count."""
        return self._run(self._counter(worker_id, "inflight", -n))

    def record_prefixes(self, worker_id: str, hashes: Sequence[str], ttl_s: float) -> int:
        """Note that `worker_id` caches these block hashes, for `ttl_s`; returns how many."""
        return self._run(self._call("record_prefixes", worker_id, _ms(ttl_s), *hashes)) if hashes else 0

    def best_prefix_worker(self, hashes: Sequence[str], role: str | None = None) -> tuple[str | None, int]:
        """The live worker holding the longest leading run of `hashes`, and its length (None, 0 if none)."""
        return self._run(self._best_prefix(hashes, role)) if hashes else (None, 0)

    def close(self) -> None:
        self.redis.close()


class AsyncRegistry(_Base):
    """The same API as `Registry`, with coroutines, over `redis.asyncio` (for the grpc.aio router and
    workers); use it on one event loop (its pool's connections belong to that loop)."""

    def __init__(self, client: str | redis.asyncio.Redis, cluster: str = "default", *,
                 counter_ttl_s: float = 60.0, max_connections: int = MAX_CONNECTIONS,
                 pool_timeout_s: float = POOL_TIMEOUT_S, secret: str = "") -> None:
        if isinstance(client, str):
            client = redis.asyncio.Redis.from_pool(redis.asyncio.BlockingConnectionPool.from_url(
                client, max_connections=max_connections, timeout=pool_timeout_s, decode_responses=True))
        super().__init__(client, cluster, counter_ttl_s, secret)

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

    async def place(self, prompt_role: str, rule: str = "least_loaded", *, decode_blocks: int | None = None,
                    decode_role: str = "decode", block_hashes: Sequence[str] = (), load_slack: int = 0,
                    prefix_ttl_s: float = 300.0, max_prompt_workers: int = 2) -> Placement:
        return await self._run(self._place(prompt_role, rule, decode_blocks, decode_role, block_hashes,
                                           load_slack, prefix_ttl_s, max_prompt_workers))

    async def release(self, *, decode: str | None = None, decode_blocks: int = 0, committed: bool = False,
                      inflight: str | None = None) -> None:
        if decode or inflight:
            await self._run(self._release(decode, decode_blocks, committed, inflight))

    async def reserve_decode(self, num_blocks: int, *, worker_id: str | None = None, role: str = "decode",
                             exclude: Sequence[str] = ()) -> str | None:
        return await self._run(self._reserve(num_blocks, worker_id, role, exclude))

    async def release_decode(self, worker_id: str, num_blocks: int, *, committed: bool = False) -> int:
        return await self._run(self._release_decode(worker_id, num_blocks, committed))

    async def outstanding_blocks(self, worker_id: str) -> int:
        return await self._run(self._counter(worker_id, "outstanding", 0))

    async def incr_inflight(self, worker_id: str, n: int = 1) -> int:
        return await self._run(self._counter(worker_id, "inflight", n))

    async def decr_inflight(self, worker_id: str, n: int = 1) -> int:
        return await self._run(self._counter(worker_id, "inflight", -n))

    async def record_prefixes(self, worker_id: str, hashes: Sequence[str], ttl_s: float) -> int:
        return await self._run(self._call("record_prefixes", worker_id, _ms(ttl_s), *hashes)) if hashes else 0

    async def best_prefix_worker(
        self, hashes: Sequence[str], role: str | None = None
    ) -> tuple[str | None, int]:
        return await self._run(self._best_prefix(hashes, role)) if hashes else (None, 0)

    async def aclose(self) -> None:
        await self.redis.aclose()
