"""The peer processes of the KV transport tests: each owns one real transport's two ends (sender and receiver)
and obeys commands sent over a pipe (`Peer.call`), so receivers and senders live in separate processes, as in
a cluster. Caches hold
seeded random values, so a test rebuilds any peer's initial cache locally (`initial_cache`) and checks a
receiver's cache bit for bit (`check_cache`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import time
import traceback
from typing import Any

import torch
import torch.multiprocessing as mp

from cluster.engine.kv_layout import KVLayout
from cluster.transport import create_receiver, create_sender

NUM_BLOCKS = 24
CPU_TRANSPORTS = ["gloo", "grpc"]
RECEIVER_COMMANDS = {"listen", "expect", "wait_received", "poll_received", "forget"}


def kv_layout(dtype: torch.dtype) -> KVLayout:
    return KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=dtype)


def initial_cache(dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(kv_layout(dtype).cache_shape(NUM_BLOCKS), generator=g).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def peer_main(conn: Any, name: str, dtype: torch.dtype, device: str, seed: int, send: dict[str, Any],
              receive: dict[str, Any]) -> None:
    """A worker process: owns one transport's sender and receiver (options `send`, `receive`) and answers
    (command, *args) messages until "exit"."""
    faulthandler.enable()
    pad = torch.ones(300, device=device)  # noqa: F841  # on CUDA: the cache then sits at an offset in its segment
    cache = initial_cache(dtype, seed).to(device)
    sender = create_sender(name, kv_layout(dtype), cache, **send)
    receiver = create_receiver(name, kv_layout(dtype), cache, **receive)
    keep: list[Any] = []
    while True:
        cmd, *args = conn.recv()
        t0, out = time.monotonic(), None
        faulthandler.dump_traceback_later(20)  # a command stuck this long prints every thread's stack
        try:
            if cmd == "exit":
                sender.close()
                receiver.close()
                conn.send(("ok", None, 0.0))
                return
            if cmd == "cache":
                out = cache.cpu()
            elif cmd == "half_send":
                keep.append(half_send(name, cache, *args))
            elif cmd == "streams":
                run_streams(sender, *args)
            else:
                out = getattr(receiver if cmd in RECEIVER_COMMANDS else sender, cmd)(*args)
            faulthandler.cancel_dump_traceback_later()
            conn.send(("ok", out, time.monotonic() - t0))
        except Exception as e:
            faulthandler.cancel_dump_traceback_later()
            conn.send(("err", f"{type(e).__name__}: {e}", time.monotonic() - t0,
                       [c.__name__ for c in type(e).__mro__], traceback.format_exc()))


def run_streams(sender: Any, endpoint: str, script: list[tuple[Any, ...]]) -> None:
    """Drive send streams step by step, as a prefill's layer hook and its worker do:
    ("open", rid, dst) | ("layers", rid, src, upto) | ("finish", rid, src) | ("abort", rid)."""
    streams: dict[str, Any] = {}
    for op, rid, *args in script:
        if op == "open":
            streams[rid] = sender.open_send(endpoint, rid, args[0], 20.0)
        elif op == "layers":
            streams[rid].layers_ready(*args)
        elif op == "finish":
            streams[rid].finish(args[0])
        else:
            streams[rid].abort()


def half_send(name: str, cache: torch.Tensor, endpoint: str, rid: str, dst: list[int], timeout_s: float) -> Any:
    """nccl/gloo only: pair and announce a transfer and its first chunk, then never send the data (a sender
    that hangs or dies between header and data). Speaks the wire protocol by hand on purpose."""
    from cluster.transport import kv_transfer_pb2 as kpb
    from cluster.transport.api import parse_endpoint
    from cluster.transport.control import ControlConn
    from cluster.transport.dist_group import PairGroups

    ctl = ControlConn.connect(endpoint, timeout_s)
    ctl.send(kpb.KVControl(dist_pair=kpb.DistPair(timeout_s=timeout_s)))
    paired = ctl.recv(timeout_s).dist_paired
    pg = PairGroups(name, "127.0.0.1", cache.device).join(parse_endpoint(endpoint)[0], paired.store_port,
                                                         paired.pair_id, 0, timeout_s)
    lay = kv_layout(cache.dtype)
    ctl.send(kpb.KVControl(begin=kpb.KVBegin(seq=1, request_id=rid, dst_block_ids=dst, timeout_s=timeout_s,
                                             dtype=str(lay.dtype),
                                             block_shape=[lay.block_size, lay.num_kv_heads, lay.head_dim])))
    ctl.send(kpb.KVControl(layers=kpb.KVLayers(
        seq=1, lo=0, hi=lay.num_layers,
        numel=lay.num_layers * 2 * len(dst) * lay.block_size * lay.num_kv_heads * lay.head_dim)))
    return ctl, pg


class Peer:
    """Test-side handle of a `peer_main` process."""

    def __init__(self, name: str, dtype: torch.dtype, seed: int, device: str = "cpu",
                 send: dict[str, Any] | None = None, receive: dict[str, Any] | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=peer_main, args=(child, name, dtype, device, seed, send or {}, receive or {}),
                                daemon=True)
        self.proc.start()
        self.seed, self.dtype = seed, dtype

    def call(self, cmd: str, *args: Any, timeout: float = 30.0) -> tuple[Any, float]:
        """Run a command in the peer; returns (result, seconds it took); re-raises errors as RemoteError."""
        self.conn.send((cmd, *args))
        if not self.conn.poll(timeout):
            raise AssertionError(f"peer did not answer {cmd} within {timeout}s")
        status, out, elapsed, *err = self.conn.recv()
        if status == "err":
            raise RemoteError(out, err[0], err[1], elapsed)
        return out, elapsed

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)

    def stop(self) -> int | None:
        """Ask the peer to close its transport and exit; returns its exit code (0: clean)."""
        if self.proc.is_alive():
            with contextlib.suppress(Exception):
                self.call("exit", timeout=10)
            self.proc.join(10)
            if self.proc.is_alive():
                self.kill()
        return self.proc.exitcode


def stop_all(*peers: Peer) -> None:
    """Stop peers that are still running and check that they exited cleanly (no C++ abort at teardown)."""
    codes = {i: p.stop() for i, p in enumerate(peers) if p.proc.is_alive()}
    assert all(c == 0 for c in codes.values()), f"peers exited with {codes}"


class RemoteError(Exception):
    def __init__(self, msg: str, mro: list[str], tb: str, elapsed: float) -> None:
        super().__init__(msg)
        self.mro, self.tb, self.elapsed = mro, tb, elapsed


def pick_blocks(rng: torch.Generator, n: int) -> tuple[list[int], list[int]]:
    src = torch.randperm(NUM_BLOCKS, generator=rng)[:n].tolist()
    dst = torch.randperm(NUM_BLOCKS, generator=rng)[:n].tolist()
    return src, dst


def check_cache(got: torch.Tensor, expected: torch.Tensor, anything_in: tuple[int, ...] = ()) -> None:
    """Bit-equal, except blocks `anything_in` (those of a transfer cut off mid-way: their owner's, only)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    diff = (bits(got) != bits(expected)).flatten(3).any(-1).any(0).any(0).nonzero().flatten().tolist()
    diff = [b for b in diff if b not in anything_in]
    assert not diff, f"blocks differ from the expected cache: {diff}"


