"""Requests that outlive a failure. When another attempt may follow a failed one (`router.migration`), then
on one real CPU cluster (local Ray, redis-server, router, 2 prefill + 2 decode workers, gloo KV transport):
- kv_failure_policy: a prefill worker stalls (SIGSTOP) before it pushes the KV of the requests placed on it;
  their KV never arrives within the lease. Under "fail" those requests end DEADLINE_EXCEEDED, naming the
  worker; under "recompute" every request completes, prefilled again on the other prefill worker, equal to
  the offline engine;
- migration: a decode worker hangs (SIGSTOP, its streams up) or is killed mid-stream with 16 greedy requests
  in flight: every one completes on the other decode worker as one stream, tokens and text equal to the
  offline engine.
Every KV block is back in its pool afterwards, as the workers report it (GetStats), and no registry counter
is left taken.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections.abc import Callable

import grpc
import psutil
import pytest
from pdserve import AsyncClient
from pdserve.errors import PdserveError
from prometheus_client.parser import text_string_to_metric_families

from cluster.cluster_config import ClusterConfig, EngineOptions
from cluster.engine import LLM, SamplingParams
from cluster.registry import Registry
from router.config import RouterConfig
from router.errors import RouterError
from router.migration import KV_HANDOFF, WORKER_LOST, AttemptFailed, Progress, handoff_failure, stream_failure
from router.server import RouterServer, serve
from router.worker_sessions import StreamStalled
from tests.cluster_harness import ClusterHarness
from tests.sdk_router_helpers import wait_for

MAX_TOKENS = 96  # long enough that a kill after 3 deltas lands mid-stream
LEASE_MS = 6_000  # the stalled prefill worker's requests: KV missing after this long (others' prefills fit)
PROMPTS = [f"Request {i} about {'rivers' if i % 2 else 'mountains and the sea'}" + " again" * (i % 4)
           for i in range(16)]
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def _config(**kw: object) -> RouterConfig:
    return RouterConfig(model_dir="m", redis_url="redis://x", **kw)  # type: ignore[arg-type]


def test_which_failures_another_attempt_may_mend() -> None:
    Code = grpc.StatusCode
    lost = stream_failure(RouterError(Code.UNAVAILABLE, "stream broke"), "d0")
    assert isinstance(lost, AttemptFailed) and lost.cause == WORKER_LOST and lost.workers == {"d0"}
    for code in (Code.DEADLINE_EXCEEDED, Code.ABORTED, Code.INTERNAL, Code.RESOURCE_EXHAUSTED):
        assert isinstance(stream_failure(RouterError(code, "x"), "d0"), RouterError)  # not a lost worker
    hung = stream_failure(StreamStalled(Code.DEADLINE_EXCEEDED, "decode on worker d0: no tokens for 2s"), "d0")
    assert isinstance(hung, AttemptFailed) and hung.cause == WORKER_LOST and hung.workers == {"d0"}
    for code in (Code.ABORTED, Code.DEADLINE_EXCEEDED):
        kv = handoff_failure(RouterError(code, "kv"), ["p0", "p1"])
        assert isinstance(kv, AttemptFailed) and kv.cause == KV_HANDOFF and kv.workers == {"p0", "p1"}
    for code in (Code.UNAVAILABLE, Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED):  # placement's, or the client's
        assert isinstance(handoff_failure(RouterError(code, "x"), ["p0"]), RouterError)


def test_attempt_limits() -> None:
    Code = grpc.StatusCode

    def lost(w: str) -> AttemptFailed:
        return AttemptFailed(RouterError(Code.UNAVAILABLE, "gone"), WORKER_LOST, [w])

    kv = AttemptFailed(RouterError(Code.ABORTED, "push failed"), KV_HANDOFF, ["p0"])
    p = Progress()
    assert p.may_continue(lost("d0"), _config(migration_limit=2), ["d0", "d1", "d2"], None)
    assert p.may_continue(lost("d1"), _config(migration_limit=2), ["d0", "d1", "d2"], 5.0)
    assert not p.may_continue(lost("d2"), _config(migration_limit=2), ["d0", "d1", "d2", "d3"], None)  # limit
    assert p.lost == {"d0", "d1", "d2"} and p.migrations == 2
    assert not Progress().may_continue(lost("d0"), _config(), ["d0"], None)  # no other worker to go to
    assert not Progress().may_continue(lost("d0"), _config(migration_limit=0), ["d0", "d1"], None)
    assert not Progress().may_continue(lost("d0"), _config(), ["d0", "d1"], 0.0)  # the client's deadline passed
    p = Progress()
    assert p.may_continue(kv, _config(), [], None) and p.avoid == {"p0"}
    assert not p.may_continue(kv, _config(), [], None)  # once per request
    assert not Progress().may_continue(kv, _config(kv_failure_policy="fail"), [], None)


@pytest.fixture(scope="module")
def offline(tiny_llama) -> list[tuple[list[int], str, int]]:
    """Each prompt's tokens, text and prompt length from the offline engine."""
    llm = LLM(str(tiny_llama), num_kv_blocks=512)
    return [(o.token_ids, o.text, len(o.prompt_token_ids)) for o in llm.generate(PROMPTS, GREEDY)]


def assert_offline(result, expected: tuple[list[int], str, int], what: str) -> None:
    """Tokens, text and usage as the offline engine has them: a migration neither loses nor repeats a token,
    and the prompt reported is the client's, not the one prefilled again."""
    assert (result.token_ids, result.text) == expected[:2], what
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (expected[2], MAX_TOKENS), what
    assert result.finish_reason == "length", what


@pytest.fixture(scope="module")
def harness(ray_session, tiny_llama):
    config = ClusterConfig(model=str(tiny_llama), prefill=2, decode=2, transport="gloo", port=0, http_port=None,
                           cluster_name="migration", policy="round_robin", max_queue=64,
                           engine=EngineOptions(num_kv_blocks=256, max_num_seqs=32))
    yield (h := ClusterHarness(config))
    h.close()


def _registry(harness: ClusterHarness) -> Registry:
    return Registry(harness.cluster.redis_url, harness.cluster.config.cluster_name, secret=harness.cluster.secret)


def assert_nothing_held(harness: ClusterHarness) -> None:
    """Every live worker's blocks free (its own report), and no router counter left in the registry."""
    stats = harness.wait_all_blocks_free(timeout_s=15.0)
    registry = _registry(harness)
    for w, _ in registry.list_workers():  # incr_inflight(w, 0) reads the count
        wait_for(lambda w=w: not registry.outstanding_blocks(w.worker_id)
                 and not registry.incr_inflight(w.worker_id, 0), 5.0, f"registry counters of {w.worker_id} still taken")
    assert {s.worker_id for s in stats} <= {w.worker_id for w, _ in registry.list_workers()}


def _engine_process(address: str) -> psutil.Process:
    """A worker's engine process (its Ray actor): the parent of the front end that listens on `address`."""
    port = int(address.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid).parent()
    raise AssertionError(f"no process listens on {address}")


async def _generate(address: str, indices: list[int], before: Callable[[], None]) -> list[object]:
    """Each request's GenerateResult or PdserveError; `before()` runs once the client is connected, right
    before the requests go out."""
    async with AsyncClient(address, timeout=60) as client:
        await client.server_info()
        before()
        return await asyncio.gather(*(
            client.generate(PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True) for i in indices),
            return_exceptions=True)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["fail", "recompute"])
@pytest.mark.timeout(60, func_only=True)
def test_kv_that_never_arrives_fails_or_is_recomputed(harness, offline, policy):
    """Round robin over 2 prefill workers, one stalled: 2 of 4 requests wait on it for their KV."""
    router: RouterServer = harness.run(serve(dataclasses.replace(
        harness.cluster.router.config, port=0, http_port=None, kv_failure_policy=policy, reserve_lease_ms=LEASE_MS)))
    wait_for(lambda: router.serving, 10.0, "the second router does not see the cluster")
    stalled_info = next(w for w in harness.cluster.worker_info if w["role"] == "prefill")
    stalled = _engine_process(stalled_info["address"])
    indices = [0, 1, 2, 3]
    try:  # stalled right before the requests go out: still live in the registry (1.5 s TTL), so placed on
        t0 = time.monotonic()
        results = asyncio.run(_generate(router.address, indices, lambda: stalled.send_signal(signal.SIGSTOP)))
        took = time.monotonic() - t0
    finally:
        stalled.send_signal(signal.SIGCONT)
        harness.run(router.stop(grace=1.0))
    failed = [r for r in results if isinstance(r, PdserveError)]
    done = [(i, r) for i, r in zip(indices, results, strict=True) if not isinstance(r, BaseException)]
    for i, r in done:
        assert_offline(r, offline[i], f"request {i}")
        assert r.prefill_worker != stalled_info["worker_id"]
    if policy == "fail":
        assert len(failed) == 2 and len(done) == 2, results
        for err in failed:
            assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED and stalled_info["worker_id"] in err.reason, err
        assert all(r.num_migrations == 0 for _, r in done)
    else:
        assert not failed and len(done) == 4, results
        assert sorted(r.num_migrations for _, r in done) == [0, 0, 1, 1]
    assert took < LEASE_MS / 1000 * 2 + 15, took  # one lease per failed attempt, not a hang
    assert_nothing_held(harness)


async def _fail_decode_mid_stream(harness: ClusterHarness, address: str, fail: Callable[[str], None],
                                  ) -> tuple[str, dict[str, int], list[object]]:
    """16 greedy streams through the router at `address`; once each has 3 deltas, `fail(worker_id)` the decode
    worker running most of them. Returns the victim, the decode workers' running counts then, and each stream's
    result (or error)."""
    async with AsyncClient(address, timeout=60) as client:
        streams = [client.generate_stream(p, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
                   for p in PROMPTS]
        heads = [[await s.__anext__() for _ in range(3)] for s in streams]
        running = {s.worker_id: s.num_running for s in await asyncio.to_thread(harness.worker_stats)
                   if s.role == "decode"}
        victim = max(running, key=lambda w: running[w])
        fail(victim)

        async def rest(stream, head) -> object:
            try:
                tail = [d async for d in stream]
            except PdserveError as err:
                return err
            result = await stream.result()
            assert [t for d in head + tail for t in d.token_ids] == result.token_ids  # the deltas are the result
            return result

        results = await asyncio.gather(*(rest(s, h) for s, h in zip(streams, heads, strict=True)))
    return victim, running, results


def _assert_moved_off(victim: str, running: dict[str, int], results: list[object], offline) -> int:
    """Every request completed as the offline engine has it, the victim's moved once; returns how many moved."""
    assert running[victim] > 0 and sum(running.values()) == len(PROMPTS), running
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    for i, r in enumerate(results):
        assert_offline(r, offline[i], f"request {i}")
    moved = [r for r in results if r.num_migrations]
    assert len(moved) == running[victim] and all(r.num_migrations == 1 for r in moved), running
    assert all(r.decode_worker != victim for r in results)
    return len(moved)


@pytest.mark.slow
@pytest.mark.timeout(90, func_only=True)
def test_hung_decode_worker_mid_stream_its_requests_continue_elsewhere(harness, offline):
    """A decode worker's engine process stops (SIGSTOP) mid-stream while its front end and streams stay up:
    after decode_chunk_timeout_s without a token, its requests move to the other decode worker. Resumed, it
    frees what it held and serves again."""
    router: RouterServer = harness.run(serve(dataclasses.replace(
        harness.cluster.router.config, port=0, http_port=None, decode_chunk_timeout_s=2.0)))
    wait_for(lambda: router.serving, 10.0, "the second router does not see the cluster")
    stopped: list[psutil.Process] = []

    def stop(worker_id: str) -> None:
        info = next(w for w in harness.cluster.worker_info if w["worker_id"] == worker_id)
        stopped.append(_engine_process(info["address"]))
        stopped[0].send_signal(signal.SIGSTOP)

    try:
        t0 = time.monotonic()
        victim, running, results = asyncio.run(_fail_decode_mid_stream(harness, router.address, stop))
        took = time.monotonic() - t0
    finally:
        for p in stopped:
            p.send_signal(signal.SIGCONT)
        harness.run(router.stop(grace=1.0))
    _assert_moved_off(victim, running, results, offline)
    assert took < 30, took  # one chunk timeout, then the other worker's speed: not the 60 s default
    registry = _registry(harness)
    wait_for(lambda: victim in {w.worker_id for w, _ in registry.list_workers()}, 10.0, "it did not register again")
    assert_nothing_held(harness)


@pytest.mark.slow
@pytest.mark.timeout(60, func_only=True)
def test_killed_decode_worker_mid_stream_its_requests_continue_elsewhere(harness, offline, ray_session):
    """Last: it kills a decode worker (the supervisor replaces it later)."""
    def kill(worker_id: str) -> None:
        ray_session.kill(harness.cluster.workers[next(
            i for i, w in enumerate(harness.cluster.worker_info) if w["worker_id"] == worker_id)])

    victim, running, results = asyncio.run(_fail_decode_mid_stream(harness, harness.address, kill))
    moved = _assert_moved_off(victim, running, results, offline)
    scrape = harness.cluster.router.metrics.exposition([]).decode()
    counted = {s.name: s.value for f in text_string_to_metric_families(scrape) for s in f.samples}
    assert counted["pdserve:num_requests_migrated_total"] == moved
    assert_nothing_held(harness)
