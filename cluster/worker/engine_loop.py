"""Runs an `LLMEngine` on its own thread, so no handler ever blocks on a forward pass.

Other threads (or asyncio code) hand the engine thread work with `call(fn)` (run between steps). Outputs
leave in two ways: a request `watch`ed in this process gets each output through its callback (a prefill
worker waits for its first token so); a request `route`d to a router has its outputs packed, with every
other routed output of the same step, into one `StepBatch` per step, handed to `on_step` (the worker's
link to its gRPC front end, another process). The engine is only touched by its own thread, except for its
thread-safe `reserve`/`release_reservation`: calls run holding the engine's `state_lock`, so they never
interleave with a reservation made from another thread (`reserve`). `stats` is refreshed after every call,
step and reservation (before their results are delivered), and `on_blocks_freed` (if set) is called by the
thread that saw KV blocks go back to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from cluster.engine import LLMEngine, StepOutput
from cluster.engine.llm_engine import EngineStats
from cluster.engine.outputs import FINISH_ABORT

log = logging.getLogger(__name__)
T = TypeVar("T")
OutputCallback = Callable[[StepOutput | BaseException, float], None]  # (output or error, step start time)
# A routed output, plain values only (it crosses a process boundary with `marshal`):
# (request_id, token_ids, text, logprobs or None, finish_reason ("" until the end), cached prompt tokens, error)
# where logprobs is [(token_id, logprob, [(top token, logprob), ...best first]), ...].
RoutedOutput = tuple[str, list[int], str, list | None, str, int, str]
FINISH_ERROR = "error"


@dataclass(frozen=True)
class StepBatch:
    """One engine step's routed outputs: `outputs[router_id]` in step order; `step_ms` the step's time."""

    step_ms: float
    outputs: dict[str, list[RoutedOutput]]


def routed(out: StepOutput, error: str = "") -> RoutedOutput:
    """An engine output as a routed output (see `RoutedOutput`)."""
    lps = None
    if out.logprobs:
        lps = [(t, lp[t], sorted(lp.items(), key=lambda x: -x[1])) for t, lp in zip(out.new_token_ids, out.logprobs,
                                                                                   strict=True)]
    return (out.request_id, out.new_token_ids, out.text_delta, lps, out.finish_reason or "", out.num_cached_tokens,
            error)


class EngineLoop:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._calls: queue.SimpleQueue[tuple[Callable[[LLMEngine], Any], Future]] = queue.SimpleQueue()
        self._watchers: dict[str, OutputCallback] = {}
        self._routes: dict[str, str] = {}  # request id -> router id
        self.on_step: Callable[[StepBatch], None] | None = None
        self._stop = threading.Event()
        self.stats: EngineStats = engine.stats()
        self.on_blocks_freed: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[LLMEngine], T]) -> Future[T]:
        """Run `fn(engine)` on the engine thread before its next step."""
        fut: Future[T] = Future()
        if self._stop.is_set():
            fut.set_exception(RuntimeError("engine loop is stopped"))
        else:
            self._calls.put((fn, fut))
        return fut

    async def acall(self, fn: Callable[[LLMEngine], T]) -> T:
        return await asyncio.wrap_future(self.call(fn))

    def watch(self, request_id: str, callback: OutputCallback) -> None:
        """Deliver the request's outputs to `callback` (on the engine thread) until one is finished."""
        self._watchers[request_id] = callback

    def route(self, request_id: str, router_id: str) -> None:
        """Send the request's outputs to `router_id` in the step batches (engine thread: call it from `call`)."""
        self._routes[request_id] = router_id

    def abort(self, request_id: str) -> Future[bool]:
        """Abort the request in the engine; its watcher or router gets a final output with finish reason
        "abort"."""
        return self.call(lambda engine: self._abort(engine, request_id))

    def abort_routed(self, router_id: str | None = None) -> Future[int]:
        """Abort every request routed to `router_id` (its stream is gone), or with None every routed request
        (the front end that carried their streams is gone); returns how many."""

        def do_abort(engine: LLMEngine) -> int:
            rids = [rid for rid, r in self._routes.items() if router_id is None or r == router_id]
            for rid in rids:
                self._abort(engine, rid)
            return len(rids)

        return self.call(do_abort)

    def _abort(self, engine: LLMEngine, request_id: str) -> bool:
        found = engine.abort(request_id)
        out = StepOutput(request_id, [], "", True, FINISH_ABORT)
        cb = self._watchers.pop(request_id, None)
        if cb is not None:
            cb(out, time.perf_counter())
        router = self._routes.pop(request_id, None)
        if router is not None and self.on_step is not None:
            self.on_step(StepBatch(0.0, {router: [routed(out)]}))
        return found

    def stop(self) -> None:
        self._stop.set()
        self._calls.put((lambda e: None, Future()))
        self._thread.join(timeout=10)

    def _drain_calls(self, block: bool) -> None:
        try:
            item = self._calls.get(timeout=0.05) if block else self._calls.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    with self.engine.state_lock:
                        result = fn(self.engine)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    self._refresh_stats()
                    fut.set_exception(e)
                else:
                    self._refresh_stats()
                    fut.set_result(result)
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        if self.engine.device.type == "cuda":  # the current device is per thread
            torch.cuda.set_device(self.engine.device)
        idle = True
        while not self._stop.is_set():
            # Block for calls when there is nothing to run, or when the last step could schedule nothing
            # (requests waiting for blocks that a KV send or a lease will free): no busy spinning.
            self._drain_calls(block=idle or not self.engine.has_unfinished())
            if not self.engine.has_unfinished():
                idle = True
                continue
            started = time.perf_counter()
            try:
                outputs = self.engine.step()
            except Exception as e:  # a failed step fails every request it may have touched
                log.exception("engine step failed")
                self._fail_all(e)
                self._refresh_stats()
                continue
            self._refresh_stats()
            # Not `not outputs`: a step of prompt chunks yields none, and a chunked prefill on an otherwise idle
            # worker must not wait for calls between its chunks.
            idle = self.engine.last_step_tokens == 0
            if outputs:
                self._deliver(outputs, started)
        self._fail_all(RuntimeError("engine loop stopped"))

    def _deliver(self, outputs: list[StepOutput], started: float) -> None:
        """Each output to its watcher; the routed ones packed into one batch for `on_step`."""
        batch: dict[str, list[RoutedOutput]] = {}
        for out in outputs:
            rid = out.request_id
            cb = self._watchers.get(rid)
            if cb is not None:
                if out.finished:
                    del self._watchers[rid]
                cb(out, started)
                continue
            router = self._routes.get(rid)
            if router is not None:
                if out.finished:
                    del self._routes[rid]
                batch.setdefault(router, []).append(routed(out))
        if batch and self.on_step is not None:
            self.on_step(StepBatch((time.perf_counter() - started) * 1e3, batch))

    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        """`LLMEngine.reserve` from any thread, without waiting for the current step; `stats` show it at once."""
        blocks = self.engine.reserve(request_id, num_tokens)
        self._refresh_stats()
        return blocks

    def _refresh_stats(self) -> None:
        with self.engine.state_lock:  # the engine thread and reserve(): each increase is seen by exactly one
            old, self.stats = self.stats, self.engine.stats()
            new = self.stats
        if self.on_blocks_freed is not None and new.num_free_blocks > old.num_free_blocks:
            try:
                self.on_blocks_freed()
            except Exception:  # the hook's event loop is gone (shutdown): nobody to tell
                log.debug("on_blocks_freed failed", exc_info=True)

    def _fail_all(self, error: BaseException) -> None:
        watchers, self._watchers = self._watchers, {}
        for rid, cb in watchers.items():
            self.engine.abort(rid)
            cb(error, time.perf_counter())
        routes, self._routes = self._routes, {}
        batch: dict[str, list[RoutedOutput]] = {}
        for rid, router in routes.items():
            self.engine.abort(rid)
            out = StepOutput(rid, [], "", True, FINISH_ERROR)
            batch.setdefault(router, []).append(routed(out, f"engine failed: {error}"))
        if batch and self.on_step is not None:
            self.on_step(StepBatch(0.0, batch))


def output_queue(loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Queue, OutputCallback]:
    """An asyncio queue and a thread-safe callback that feeds it (for `EngineLoop.watch`)."""
    q: asyncio.Queue = asyncio.Queue()

    def callback(item: StepOutput | BaseException, started: float) -> None:
        loop.call_soon_threadsafe(q.put_nowait, (item, started))

    return q, callback
