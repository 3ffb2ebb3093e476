"""Runs an `LLMEngine` on its own thread, so gRPC handlers never block on a forward pass.

Other threads (or asyncio code) hand the engine thread work with `call(fn)` (run between steps) and
receive per-request outputs through a callback registered with `watch`. The engine is only touched by
its own thread, except for its thread-safe `reserve`/`release_reservation`: calls run holding the
engine's `state_lock`, so they never interleave with a reservation made from another thread (`reserve`).
`stats` is refreshed after every call, step and reservation (before their results are delivered), and
`on_blocks_freed` (if set) is called by the thread that saw KV blocks go back to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from cluster.engine import LLMEngine, StepOutput
from cluster.engine.llm_engine import EngineStats
from cluster.engine.outputs import FINISH_ABORT

log = logging.getLogger(__name__)
T = TypeVar("T")
OutputCallback = Callable[[StepOutput | BaseException, float], None]  # (output or error, step start time)


class EngineLoop:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._calls: queue.SimpleQueue[tuple[Callable[[LLMEngine], Any], Future]] = queue.SimpleQueue()
        self._watchers: dict[str, OutputCallback] = {}
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

    def abort(self, request_id: str) -> Future[bool]:
        """Abort the request in the engine; a watcher gets a final output with finish reason "abort"."""

        def do_abort(engine: LLMEngine) -> bool:
            found = engine.abort(request_id)
            cb = self._watchers.pop(request_id, None)
            if cb is not None:
                cb(StepOutput(request_id, [], "", True, FINISH_ABORT), time.perf_counter())
            return found

        return self.call(do_abort)

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
            # Not `not outputs`: a step of prompt chunks yields none, and waiting 50 ms for calls after each
            # chunk made a chunked prefill on an otherwise idle worker ~10x slower.
            idle = self.engine.last_step_tokens == 0
            for out in outputs:
                cb = self._watchers.get(out.request_id)
                if cb is not None:
                    if out.finished:
                        del self._watchers[out.request_id]
                    cb(out, started)
        self._fail_all(RuntimeError("engine loop stopped"))

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


def output_queue(loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Queue, OutputCallback]:
    """An asyncio queue and a thread-safe callback that feeds it (for `EngineLoop.watch`)."""
    q: asyncio.Queue = asyncio.Queue()

    def callback(item: StepOutput | BaseException, started: float) -> None:
        loop.call_soon_threadsafe(q.put_nowait, (item, started))

    return q, callback
