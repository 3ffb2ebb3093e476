"""The two processes of `pdserve bench kv`: a sender that drives and times everything, a receiver that serves.

Both are spawned by `kv_bench.run_kv_bench` and talk over one multiprocessing Pipe (the coordination
channel; never timed). The receiver answers each command `(op, *args)` with `("ok", value)` or
`("err", message)`. Per timed handoff: sender -> "expect" (the receiver `expect()`s and answers only then),
sender times `send()` (CUDA synchronised on both sides of it), sender -> "received" (the receiver
`wait_received()`s, or `forget()`s after a failed send). The raw reference is a 2-rank default process
group (gloo on CPU, NCCL on CUDA) over a TCPStore the sender hosts on a free port: per repetition the
receiver posts its receive and answers, then the sender times one contiguous tensor of the same byte
count, sender -> receiver, plus a 1-element ack back, so it ends where a handoff's `send()` ends (the
sender knows the receiver holds the bytes). With both processes on one GPU (NCCL cannot pair a GPU with
itself) the group is gloo and only verifies; the raw reference is then one copy of the same bytes within
the GPU, timed in the sender.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from cluster.bench.kv_plan import Plan, block_ids, busy_python, timed_loop
from cluster.bench.kv_prefill import build_engine, prefill_rows
from cluster.kv_trace import KVTrace
from cluster.transport import create_receiver, create_sender

_CMD_TIMEOUT_S = 600.0  # the receiver's patience between commands, and the sender's for a plain answer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + ((str(e).strip().splitlines() or [""])[0][:400])


def _init_group(plan: Plan, rank: int, store: dist.Store, device: torch.device) -> None:
    """The raw reference's 2-rank group, plus one tiny exchange so NCCL's p2p communicator exists before any
    receive is posted ahead of the sender (its creation blocks until both ranks join)."""
    dist.init_process_group(plan.raw_backend, store=store, rank=rank, world_size=2,
                            timeout=timedelta(seconds=plan.send_timeout_s + 60))
    one = torch.zeros(1, device=plan.group_device(device))
    if rank == 0:
        dist.send(one, 1)
    else:
        dist.recv(one, 0)
    _sync(device)


def worker(rank: int, plan: Plan, conn: Any, results: Any) -> None:
    """Process entry point: rank 0 is the sender (puts ("result", rows) on `results`), rank 1 the receiver."""
    if plan.switch_interval_s is not None:
        sys.setswitchinterval(plan.switch_interval_s)
    if rank == 1 and plan.receiver_busy:
        threading.Thread(target=busy_python, name="busy-python", daemon=True).start()
    try:
        device = torch.device(plan.devices[rank])
        if device.type == "cuda":
            torch.cuda.set_device(device)  # by index: both processes see every GPU (cuda_ipc needs that)
        engine = build_engine(plan, device) if rank == 0 and plan.prefill_model is not None else None
        cache = plan.layout.allocate(plan.num_blocks, device) if engine is None else engine.kv_cache
        if rank == 0:
            g = torch.Generator(device=device).manual_seed(plan.seed)
            cache.normal_(generator=g)
            results.put(("result", Sender(plan, cache, conn).run(engine)))
        else:
            Receiver(plan, cache, conn).serve()
            results.put(("done", None))
    except BaseException as e:
        results.put(("error", f"{['sender', 'receiver'][rank]}: {_line(e)}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class Receiver:
    """Owns the receiving cache; answers the sender's commands until "exit" (or the pipe closes)."""

    def __init__(self, plan: Plan, cache: torch.Tensor, conn: Any) -> None:
        self.plan, self.cache, self.conn, self.device = plan, cache, conn, cache.device
        self.transport: Any = None
        self._ack = torch.zeros(1, dtype=plan.layout.dtype, device=self.device)
        self._buf = torch.empty(0, dtype=plan.layout.dtype, device=self.device)

    def serve(self) -> None:
        while True:
            if not self.conn.poll(_CMD_TIMEOUT_S):
                raise TimeoutError(f"no command from the sender in {_CMD_TIMEOUT_S:.0f}s")
            op, *args = self.conn.recv()
            if op == "raw":  # answers once its receive is posted: the sender's clock starts on that answer
                self._raw(*args)
            elif op == "verify":  # answer first: the sender then posts its receives
                self.conn.send(("ok", None))
                self._verify(*args)
            else:
                try:
                    out = getattr(self, f"_op_{op}")(*args)
                except Exception as e:
                    self.conn.send(("err", _line(e)))
                else:
                    self.conn.send(("ok", out))
            if op == "exit":
                return

    def _op_init(self, port: int) -> None:
        """Join the raw group (the sender joins concurrently; it waits for this answer afterwards)."""
        _init_group(self.plan, 1, dist.TCPStore("127.0.0.1", port, 2, False, timeout=timedelta(seconds=60)),
                    self.device)

    def _op_close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    _op_exit = _op_close

    def _op_transport(self, name: str) -> str:
        self._op_close()
        self.transport = create_receiver(name, self.plan.layout, self.cache, trace=KVTrace.from_env())
        return self.transport.listen()

    def _op_expect(self, rid: str, dst: list[int], clear: bool) -> None:
        if clear:  # a fresh, all-zero cache before a verified transfer: stale data cannot pass for new
            self.cache.zero_()
            _sync(self.device)
        self.transport.expect(rid, dst)

    def _op_received(self, rid: str, ok: bool) -> None:
        if ok:
            self.transport.wait_received(rid, 30.0)
        else:
            self.transport.forget(rid)

    def _raw(self, numel: int) -> None:
        if self._buf.numel() != numel:  # one buffer per size: no page faults inside the timed receive
            self._buf = torch.empty(0, dtype=self._buf.dtype, device=self.device)  # the old one freed first
            self._buf = torch.zeros(numel, dtype=self._buf.dtype, device=self.device)
        work = dist.irecv(self._buf, 0)
        self.conn.send(("ok", None))
        work.wait()
        dist.send(self._ack, 0)
        _sync(self.device)

    def _verify(self, dst: list[int]) -> None:
        """Send the destination blocks back over the raw group, then whether every other block is still 0."""
        wire = self.plan.group_device(self.device)
        dist.send(self.plan.layout.gather(self.cache, dst).to(wire), 0)
        others = torch.ones(self.plan.num_blocks, dtype=torch.bool, device=self.device)
        others[dst] = False
        untouched = torch.tensor([int(not self.cache[:, :, others].any())], dtype=self.plan.layout.dtype,
                                 device=wire)
        dist.send(untouched, 0)
        _sync(self.device)


class Sender:
    """Drives the run: raw p2p per prompt length, then every transport at every prompt length."""

    def __init__(self, plan: Plan, cache: torch.Tensor, conn: Any) -> None:
        self.plan, self.cache, self.conn, self.device = plan, cache, conn, cache.device
        self.layout = plan.layout

    def ask(self, *msg: Any, timeout: float = _CMD_TIMEOUT_S) -> Any:
        self.conn.send(msg)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"the receiver did not answer {msg[0]!r} within {timeout:.0f}s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"receiver, {msg[0]}: {value}")
        return value

    def run(self, engine: Any = None) -> dict[str, Any]:
        store = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=timedelta(seconds=60), wait_for_workers=False)
        self.conn.send(("init", store.port))
        _init_group(self.plan, 0, store, self.device)
        if not self.conn.poll(120) or self.conn.recv()[0] != "ok":
            raise RuntimeError("the receiver did not join the raw process group")
        raw = {p: self._raw_case(p) for p in self.plan.prompt_lens}
        rows = []
        for name in self.plan.transports:
            rows += self._transport_cases(name)
        prefill = prefill_rows(self, engine) if engine is not None else []
        self.ask("exit")
        return {"raw": raw, "rows": rows, "prefill": prefill}

    def _timed(self, once: Callable[[int], float]) -> tuple[list[float], int, bool]:
        p = self.plan
        return timed_loop(once, p.warmup, p.repeats, p.min_repeats, p.case_budget_s)

    def _raw_case(self, prompt_len: int) -> dict[str, Any]:
        src, _ = block_ids(self.plan, self.layout.blocks_for_tokens(prompt_len))
        data = self.layout.gather(self.cache, src).reshape(-1)
        ack = torch.empty(1, dtype=data.dtype, device=self.device)
        copy = torch.empty_like(data) if self.plan.one_gpu else None

        def once(_: int) -> float:
            if copy is not None:  # one GPU: what the same bytes cost within it
                _sync(self.device)
                t0 = time.perf_counter()
                copy.copy_(data)
                _sync(self.device)
                return time.perf_counter() - t0
            self.ask("raw", data.numel())
            _sync(self.device)
            t0 = time.perf_counter()
            dist.send(data, 1)
            dist.recv(ack, 1)
            _sync(self.device)
            return time.perf_counter() - t0

        times, warm, capped = self._timed(once)
        return {"times_s": times, "warmup": warm, "capped": capped}

    def _transport_cases(self, name: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        try:
            endpoint = self.ask("transport", name)
            transport = create_sender(name, self.layout, self.cache, trace=KVTrace.from_env())
        except Exception as e:
            return [{"transport": name, "prompt_len": p, "error": _line(e)} for p in self.plan.prompt_lens]
        try:
            for p in self.plan.prompt_lens:
                try:
                    rows.append({"transport": name, "prompt_len": p, **self._handoff_case(transport, endpoint, p)})
                except Exception as e:
                    rows.append({"transport": name, "prompt_len": p, "error": _line(e)})
        finally:
            transport.close()
            self.ask("close")
        return rows

    def _handoff_case(self, transport: Any, endpoint: str, prompt_len: int) -> dict[str, Any]:
        src, dst = block_ids(self.plan, self.layout.blocks_for_tokens(prompt_len))
        tag = f"{transport.name}-{prompt_len}"

        def once(i: int) -> float:
            rid = f"{tag}-{i}"
            self.ask("expect", rid, dst, i == 0)
            _sync(self.device)
            t0 = time.perf_counter()
            try:
                transport.send(endpoint, rid, src, dst, self.plan.send_timeout_s)
                _sync(self.device)
            except BaseException:
                self.ask("received", rid, False)
                raise
            elapsed = time.perf_counter() - t0
            self.ask("received", rid, True)
            if i == 0:
                self.verify(src, dst)
            return elapsed

        times, warm, capped = self._timed(once)
        return {"times_s": times, "warmup": warm, "capped": capped, "verified": True}

    def verify(self, src: list[int], dst: list[int]) -> None:
        """Bit-equal check of the receiver's destination blocks against our source blocks; raises if not."""
        wire = self.plan.group_device(self.device)
        expected = self.layout.gather(self.cache, src).to(wire)
        got, untouched = torch.empty_like(expected), torch.empty(1, dtype=expected.dtype, device=wire)
        self.ask("verify", dst)
        dist.recv(got, 1)
        dist.recv(untouched, 1)
        _sync(self.device)
        if not torch.equal(got.view(torch.uint8), expected.view(torch.uint8)):
            bad = (got != expected).flatten(3).any(-1).any(0).any(0).nonzero().flatten().tolist()
            raise RuntimeError(f"KV data differs after the handoff in {len(bad)} of {len(dst)} blocks")
        if untouched.item() != 1:
            raise RuntimeError("the handoff wrote outside the destination blocks")
