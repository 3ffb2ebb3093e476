"""KV transports end to end: real receivers and senders in separate processes, no mocks.

Each peer is a spawned process driven over a pipe by the test (see `_peer`). Caches are filled with
seeded random values, so the test rebuilds every peer's initial cache locally and checks the receiver's
final cache bit for bit: destination blocks hold the sender's source blocks, every other block is as it
was.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import torch

from cluster.transport import TransportError, create_receiver, create_sender, transport_names
from tests.transport_peers import (
    CPU_TRANSPORTS,
    Peer,
    RemoteError,
    check_cache,
    initial_cache,
    kv_layout,
    pick_blocks,
    stop_all,
)


def _scenario(name: str, dtype: torch.dtype, device: tuple[str, str, str] = ("cpu", "cpu", "cpu"),
              send: dict[str, Any] | None = None) -> None:
    """Receiver R, senders S1 (now) and S2 (pairs later, no restart); forget; timeouts; dead receiver."""
    recv = Peer(name, dtype, seed=1, device=device[0])
    s1 = Peer(name, dtype, seed=2, device=device[1], send=send)
    s2 = Peer(name, dtype, seed=3, device=device[2], send=send)
    try:
        rng = torch.Generator().manual_seed(7)
        expected = initial_cache(dtype, 1)
        endpoint, _ = recv.call("listen")
        # Few blocks: few runs (cuda_ipc: copy-engine copies); 20 scattered: many runs (its copy kernel).
        for sender, rid, n in ((s1, "r1", 5), (s1, "r1b", 1), (s2, "r2", 7), (s1, "r3", 20)):
            src, dst = pick_blocks(rng, n)
            dst = [b for b in dst if b not in (0, 1)]  # 0, 1 stay reserved for the forgotten request
            src = src[:len(dst)]
            recv.call("expect", rid, dst)
            sender.call("send", endpoint, rid, src, dst, 20.0)
            recv.call("wait_received", rid, 5.0)
            expected[:, :, dst] = initial_cache(dtype, sender.seed)[:, :, src]
        check_cache(recv.call("cache")[0], expected)

        # A forgotten request's late data is dropped (sender told), not written.
        recv.call("expect", "gone", [0, 1])
        recv.call("forget", "gone")
        with pytest.raises(RemoteError) as ei:
            s1.call("send", endpoint, "gone", [2, 3], [0, 1], 10.0)
        assert "TransportRejected" in ei.value.mro, ei.value.tb
        # Never-announced ids are dropped too; the pair survives rejections.
        with pytest.raises(RemoteError):
            s2.call("send", endpoint, "unknown", [4], [5], 10.0)
        check_cache(recv.call("cache")[0], expected)
        src, dst = [9, 10], [0, 1]
        recv.call("expect", "after", dst)
        s2.call("send", endpoint, "after", src, dst, 20.0)
        assert recv.call("poll_received")[0] == ["after"]
        expected[:, :, dst] = initial_cache(dtype, s2.seed)[:, :, src]
        check_cache(recv.call("cache")[0], expected)

        # wait_received times out (TimeoutError) instead of hanging.
        recv.call("expect", "never", [2])
        with pytest.raises(RemoteError) as ei:
            recv.call("wait_received", "never", 0.3)
        assert "TimeoutError" in ei.value.mro and 0.25 < ei.value.elapsed < 3

        # A dead receiver: the sender raises TransportError within its timeout, both for a paired sender
        # and for a fresh pairing.
        recv.kill()
        for sender in (s1, s2):
            t0 = time.monotonic()
            with pytest.raises(RemoteError) as ei:
                sender.call("send", endpoint, "late", [1, 2], [3, 4], 4.0)
            assert "TransportError" in ei.value.mro, ei.value.tb
            assert time.monotonic() - t0 < 8.0
        stop_all(s1, s2)
    finally:
        for p in (recv, s1, s2):
            p.stop()


def _stalled_scenario(name: str, device: tuple[str, str] = ("cpu", "cpu")) -> None:
    """Misbehaving peers; the receiver and the senders must survive them (NCCL: no watchdog teardown).

    torch_dist only, a silent sender: it announces a transfer and never sends the data; the receiver's pair
    gives up after the announced timeout (+ grace) and the request stays pending.
    A frozen receiver (SIGSTOP): the sender raises TransportError within its timeout; once the receiver
    resumes, the same sender pairs again and delivers.
    """
    torch_dist = name in ("gloo", "nccl")
    recv = Peer(name, torch.float32, seed=1, device=device[0], receive={"recv_grace_s": 0.5} if torch_dist else {})
    sender = Peer(name, torch.float32, seed=2, device=device[1])
    silent = Peer(name, torch.float32, seed=3, device=device[1]) if torch_dist else None
    try:
        endpoint, _ = recv.call("listen")
        expected, src_cache = initial_cache(torch.float32, 1), initial_cache(torch.float32, 2)
        recv.call("expect", "a", [1, 2])
        sender.call("send", endpoint, "a", [3, 4], [1, 2], 20.0)
        recv.call("wait_received", "a", 5.0)
        expected[:, :, [1, 2]] = src_cache[:, :, [3, 4]]

        if silent is not None:
            recv.call("expect", "s", [11, 12])
            silent.call("half_send", endpoint, "s", [11, 12], 1.0)
            with pytest.raises(RemoteError) as ei:
                recv.call("wait_received", "s", 3.0)  # 1 s announced + 0.5 s grace, then the pair is dropped
            assert "TimeoutError" in ei.value.mro
            silent.kill()
            recv.call("forget", "s")

        recv.call("expect", "b", [5, 6])
        os.kill(recv.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(RemoteError) as ei:
                sender.call("send", endpoint, "b", [7, 8], [5, 6], 2.0)
        finally:
            os.kill(recv.proc.pid, signal.SIGCONT)
        assert "TransportError" in ei.value.mro, ei.value.tb
        assert ei.value.elapsed < 2.0 + 3.0, ei.value
        recv.call("expect", "c", [9])
        sender.call("send", endpoint, "c", [10], [9], 20.0)
        recv.call("wait_received", "c", 5.0)
        expected[:, :, [9]] = src_cache[:, :, [10]]
        cut_off = (11, 12) if silent is not None else ()  # a cut-off receive may leave anything in its blocks
        if "b" in recv.call("poll_received")[0]:  # the timed-out send may still have landed, intact
            expected[:, :, [5, 6]] = src_cache[:, :, [7, 8]]
        else:
            cut_off += (5, 6)
        check_cache(recv.call("cache")[0], expected, anything_in=cut_off)
        stop_all(recv, sender)
    finally:
        with contextlib.suppress(Exception):
            os.kill(recv.proc.pid, signal.SIGCONT)
        for p in (recv, sender, silent):
            if p is not None:
                p.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", CPU_TRANSPORTS)
def test_transport_cpu(name: str, dtype: torch.dtype) -> None:
    # grpc: odd-sized chunks split elements; gloo: one layer per chunk (the chunked protocol of nccl too)
    _scenario(name, dtype, send={"chunk_bytes": 1001 if name == "grpc" else 1})


@pytest.mark.timeout(60)
def test_layer_streams_interleave_and_abort_cpu() -> None:
    """Two handoffs streamed layer by layer on one pair, interleaved, land intact; one aborted mid-way does
    not land, its receiver may take a retry, and the pair goes on (the chunked protocol of nccl, on gloo)."""
    recv = Peer("gloo", torch.float32, seed=1)
    # gloo streams synchronously: not inside a forward, but fine for a test that drives the layers by hand
    sender = Peer("gloo", torch.float32, seed=2, send={"chunk_bytes": 1, "stream_layers": True})
    try:
        endpoint, _ = recv.call("listen")
        expected, src_cache = initial_cache(torch.float32, 1), initial_cache(torch.float32, 2)
        plan = {"a": ([3, 4], [10, 11]), "b": ([5], [12]), "c": ([6, 7], [13, 14])}
        for rid, (_, dst) in plan.items():
            recv.call("expect", rid, dst)
        (sa, da), (sb, db), (sc, dc) = plan.values()
        script = [("open", "a", da), ("open", "b", db), ("open", "c", dc)]
        for upto in range(1, kv_layout(torch.float32).num_layers + 1):  # a layer at a time, interleaved
            script += [("layers", "a", sa, upto), ("layers", "b", sb, upto)]
            if upto <= 2:
                script.append(("layers", "c", sc, upto))
        script += [("abort", "c"), ("finish", "a", sa), ("finish", "b", sb)]
        sender.call("streams", endpoint, script)
        recv.call("wait_received", "a", 5.0)
        recv.call("wait_received", "b", 5.0)
        with pytest.raises(RemoteError) as ei:
            recv.call("wait_received", "c", 0.3)
        assert "TimeoutError" in ei.value.mro
        for src, dst in ((sa, da), (sb, db)):
            expected[:, :, dst] = src_cache[:, :, src]
        check_cache(recv.call("cache")[0], expected, anything_in=tuple(dc))
        sender.call("send", endpoint, "c", sc, dc, 20.0)  # the aborted request takes a plain retry
        recv.call("wait_received", "c", 5.0)
        expected[:, :, dc] = src_cache[:, :, sc]
        check_cache(recv.call("cache")[0], expected)
        stop_all(recv, sender)
    finally:
        for p in (recv, sender):
            p.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", CPU_TRANSPORTS)
def test_stalled_receiver_cpu(name: str) -> None:
    _stalled_scenario(name)


@pytest.mark.gpu
@pytest.mark.timeout(180)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("name", ["nccl", "cuda_ipc", "gloo"])
def test_transport_two_gpus(name: str) -> None:
    """Receiver on cuda:0, both senders on cuda:1 (NCCL cannot put two ranks of one pair on one GPU)."""
    _scenario(name, torch.bfloat16, ("cuda:0", "cuda:1", "cuda:1"), send={"chunk_bytes": 1})  # a chunk per layer
    _stalled_scenario(name, ("cuda:0", "cuda:1"))


@pytest.mark.gpu
@pytest.mark.timeout(180)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_ipc_on_one_gpu() -> None:
    """Receiver and senders in separate processes on one GPU (1P+1D on one GPU): CUDA IPC within a device."""
    _scenario("cuda_ipc", torch.bfloat16, ("cuda:0", "cuda:0", "cuda:0"), send={"chunk_bytes": 1})
    _stalled_scenario("cuda_ipc", ("cuda:0", "cuda:0"))


def test_block_runs() -> None:
    """cuda_ipc copies each run of ids consecutive on BOTH sides as one 2D copy."""
    from cluster.transport.ipc_copy import block_runs

    assert block_runs([], []) == []
    assert block_runs([4, 5, 6, 9, 10, 2], [7, 8, 9, 1, 3, 4]) == [(4, 7, 3), (9, 1, 1), (10, 3, 1), (2, 4, 1)]
    assert block_runs(list(range(3, 131)), list(range(500, 628))) == [(3, 500, 128)]


def test_registry_and_auto() -> None:
    assert transport_names() == ["cuda_ipc", "gloo", "grpc", "nccl"]
    layout = kv_layout(torch.float32)
    for create in (create_sender, create_receiver):
        with pytest.raises(ValueError, match="cuda_ipc, gloo, grpc, nccl"):
            create("carrier_pigeon", layout, layout.allocate(2, "cpu"))
        for name in ("gloo", "grpc"):
            with pytest.raises(ValueError):  # a cache that does not match the layout
                create(name, layout, kv_layout(torch.bfloat16).allocate(2, "cpu"))


def test_lazy_imports() -> None:
    """Importing the package (or cuda_ipc on a machine without cupy) pulls in no grpc / cupy."""
    code = ("import sys, cluster.transport, cluster.transport.ipc_sender, cluster.transport.ipc_receiver,"
            "cluster.transport.dist_sender, cluster.transport.dist_receiver;"
            "bad = [m for m in ('grpc', 'cupy') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    if importlib.util.find_spec("cupy") is None:
        layout = kv_layout(torch.float32)
        for create in (create_sender, create_receiver):
            with pytest.raises(ValueError, match="CUDA"):
                create("cuda_ipc", layout, layout.allocate(2, "cpu"))


def test_wait_and_forget_local() -> None:
    """Receiver bookkeeping without a peer: timeouts, unknown ids, forget, poll."""
    layout = kv_layout(torch.float32)
    cache = layout.allocate(4, "cpu")
    t, sender = create_receiver("gloo", layout, cache), create_sender("gloo", layout, cache)
    try:
        t.expect("a", [0, 1])
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            t.wait_received("a", 0.2)
        assert 0.15 < time.monotonic() - t0 < 2
        t.forget("a")
        with pytest.raises(KeyError):
            t.wait_received("a", 0.1)
        assert t.poll_received() == []
        with pytest.raises(TransportError):
            sender.send("127.0.0.1:1", "x", [0], [0], 2.0)  # nobody listens on port 1
    finally:
        t.close()
        sender.close()
