"""Clients that never read their streams, on a real CPU cluster (local Ray, redis-server, router, 1 prefill + 1
decode worker over gloo): they hold nothing of the cluster's once their tokens are made, ordinary requests
beside them run at their unloaded speed, and after `stream_idle_timeout_s` each unread stream is cancelled
(gRPC CANCELLED naming the limit; HTTP: the connection closed) with every KV block free.

The never-reading gRPC client is a raw channel with small HTTP/2 windows (no BDP probing, 1 KiB of lookahead
per stream), so real flow control stops the router's writes after a few dozen messages.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket
import statistics
import time

import grpc
import pytest
from pdserve import Client
from pdserve.v1 import generate_pb2 as pb
from pdserve.v1 import generate_pb2_grpc as pb_grpc

from cluster.cluster_config import ClusterConfig, EngineOptions
from router.server import serve
from tests.cluster_harness import ClusterHarness

pytestmark = pytest.mark.slow

IDLE_S = 45.0  # the cluster's stream_idle_timeout_s: room for 200 requests on a busy 2-core machine
QUICK_IDLE_S = 2.0  # a second router's (quick_router)
POOL_BLOCKS = 1024  # decode pool: 128 never-read requests at a time (8 blocks each), not all 200
N_UNREAD = 200
UNREAD_PROMPT, UNREAD_TOKENS = 104, 24  # 128 tokens = 8 blocks
LONG_TOKENS = 3900  # test_idle_stream_is_cancelled_on_its_worker_at_once: 104 + 3900 tokens fit max_model_len
LOGPROBS = 20  # about 150 bytes per token: a stream's output is 3.6 KB, its window 1 KiB
SMALL_WINDOWS = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def harness(ray_session, tiny_llama):
    config = ClusterConfig(model=str(tiny_llama), prefill=1, decode=1, transport="gloo", port=0, http_port=0,
                           cluster_name="slow-readers", stream_idle_timeout_s=IDLE_S, queue_timeout_s=60.0,
                           engine=EngineOptions(num_kv_blocks=POOL_BLOCKS, max_model_len=4096))
    yield (h := ClusterHarness(config))
    h.close()


def ordinary_seconds(client: Client, n: int, salt: int) -> list[float]:
    """Wall time of `n` ordinary requests (8 tokens in, 16 out), one after another."""
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        out = client.generate([(salt + i * 13 + k) % 400 + 3 for k in range(8)], max_tokens=16, temperature=0.0,
                              ignore_eos=True, timeout=30)
        times.append(time.perf_counter() - t0)
        assert len(out.token_ids) == 16
    return times


def unread_request(i: int, max_tokens: int = UNREAD_TOKENS) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=[(i * 7 + k) % 400 + 3 for k in range(UNREAD_PROMPT)]),
                              request_id=f"unread-{i}",
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                                         logprobs=LOGPROBS))


def read_to_the_end(call: grpc.Call) -> tuple[int, grpc.StatusCode, str]:
    """(tokens, status, details) of a stream read now, after it sat unread."""
    tokens = 0
    try:
        for msg in call:
            tokens += len(msg.delta.token_ids)
    except grpc.RpcError as err:
        return tokens, err.code(), err.details() or ""
    return tokens, Code.OK, ""


def router_state(harness: ClusterHarness) -> tuple[int, int, int]:
    orch = harness.cluster.router.orchestrator
    return orch.admission.admitted, orch.admission.num_waiting, orch.num_inflight


@pytest.mark.timeout(180, func_only=True)
def test_never_read_streams_do_not_stall_ordinary_requests(harness) -> None:
    with Client(harness.address, timeout=30) as client:
        ordinary_seconds(client, 3, 0)  # warm
        unloaded = ordinary_seconds(client, 8, 100)
        channel = grpc.insecure_channel(harness.address, options=SMALL_WINDOWS)
        stub = pb_grpc.GenerateServiceStub(channel)
        t_start = time.monotonic()
        calls = [stub.Generate(unread_request(i), timeout=120) for i in range(N_UNREAD)]
        # Their tokens are all made while they sit unread: the router takes them as they come, so its
        # admission and the decode worker are done with each as soon as its last token is out.
        deadline = t_start + IDLE_S - 10
        while router_state(harness)[:2] != (0, 0) or not _workers_idle(harness):
            assert time.monotonic() < deadline, (router_state(harness), harness.worker_stats())
            time.sleep(0.1)
        t_made = time.monotonic()
        loaded = ordinary_seconds(client, 8, 200)
        # No stream's idle clock starts before t_start: every unread stream was still open meanwhile.
        assert time.monotonic() - t_start < IDLE_S, "too slow to measure before the first idle cancel"
        print(f"unloaded {statistics.median(unloaded):.3f}s, beside {N_UNREAD} unread streams "
              f"{statistics.median(loaded):.3f}s (medians of 8); tokens made in {t_made - t_start:.1f}s")
        assert statistics.median(loaded) <= 2 * statistics.median(unloaded), (unloaded, loaded)
        time.sleep(max(0.0, t_made + IDLE_S + 1 - time.monotonic()))  # every stream's write stuck since t_made
        harness.wait_all_blocks_free(timeout_s=2)
        assert router_state(harness) == (0, 0, 0)
        outcomes = [read_to_the_end(c) for c in calls]
        channel.close()
    odd = [o for o in outcomes if o[1] != Code.CANCELLED or "stream_idle_timeout_s" not in o[2]]
    assert not odd, odd[:3]
    assert all(tokens < UNREAD_TOKENS for tokens, _, _ in outcomes)  # the tokens behind the stuck write are gone


@pytest.fixture(scope="module")
def quick_router(harness):
    """A second router on the same cluster that cuts unread streams off after QUICK_IDLE_S."""
    config = dataclasses.replace(harness.cluster.router.config, port=0, http_port=0, stream_idle_timeout_s=QUICK_IDLE_S)
    router = harness.run(serve(config))
    yield router
    harness.run(router.stop(0.5))


def decode_seconds(address: str, max_tokens: int) -> float:
    """How long the decode worker takes for `max_tokens` tokens of one request alone (from 200 of them)."""
    with Client(address, timeout=60) as client:
        t0 = time.perf_counter()
        client.generate([5] * 8, max_tokens=200, temperature=0.0, ignore_eos=True, logprobs=LOGPROBS)
        return (time.perf_counter() - t0) * max_tokens / 200


def wait_until_freed(harness: ClusterHarness, limit_s: float) -> None:
    end = time.monotonic() + limit_s
    while not _workers_idle(harness):
        assert time.monotonic() < end, harness.worker_stats()
        time.sleep(0.05)


@pytest.mark.timeout(120, func_only=True)
def test_idle_stream_is_cancelled_on_its_worker_at_once(harness, quick_router) -> None:
    """A stream whose client stops reading while its worker still decodes: cancelled after stream_idle_timeout_s,
    its blocks freed then, long before its tokens would all have been made."""
    # Long enough that its natural time is several idle limits even on a fast machine.
    natural_s = decode_seconds(harness.address, LONG_TOKENS)  # not through quick_router: a busy reader may pause 2 s
    channel = grpc.insecure_channel(quick_router.address, options=SMALL_WINDOWS)
    call = pb_grpc.GenerateServiceStub(channel).Generate(unread_request(9999, max_tokens=LONG_TOKENS), timeout=120)
    t0 = time.monotonic()
    wait_until_freed(harness, natural_s)
    freed_s = time.monotonic() - t0
    tokens, code, details = read_to_the_end(call)
    channel.close()
    assert code == Code.CANCELLED and f"stream_idle_timeout_s={QUICK_IDLE_S:g}" in details, (code, details)
    assert QUICK_IDLE_S < freed_s < natural_s / 2, (freed_s, natural_s)
    assert tokens < 100


def _workers_idle(harness: ClusterHarness) -> bool:
    return all(s.num_running == 0 and s.num_waiting == 0 and s.free_kv_blocks == s.total_kv_blocks
               for s in harness.worker_stats())


@pytest.mark.timeout(120, func_only=True)
def test_http_stream_never_read_is_reset(harness, quick_router) -> None:
    """The same over HTTP: a streamed completion whose client never reads (a small receive buffer) has its
    connection reset after stream_idle_timeout_s, and its blocks are freed."""
    # 8 choices x 1,800 tokens x ~600 bytes (20 logprobs each): more than the socket buffers hold (~3 MB)
    body = json.dumps({"prompt": [5] * 8, "max_tokens": 1800, "n": 8, "stream": True, "temperature": 0.0,
                       "ignore_eos": True, "logprobs": LOGPROBS}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", quick_router.http_port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    t0 = time.monotonic()
    while (error := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)) == 0:  # never reads
        assert time.monotonic() - t0 < 60, "the router kept the unread connection open"
        time.sleep(0.1)
    assert error == errno.ECONNRESET, os.strerror(error)
    assert time.monotonic() - t0 > QUICK_IDLE_S  # the router waited for stream_idle_timeout_s first
    sock.close()
    wait_until_freed(harness, 3.0)
