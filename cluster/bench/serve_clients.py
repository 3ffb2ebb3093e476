"""The request side of `bench serve`: one timed stream per request (`send_one`), a schedule of them at planned
times (`run_schedule`), and `ClientProcesses`, which splits a schedule over K spawned client processes so that
one client's event loop (and GIL) is not what limits a run.

Every process times on `time.perf_counter`, which on Linux is the host-wide monotonic clock: records from all
processes share one time base, and the parent merges them as if one client had sent them.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from cluster.bench.metrics import SERVER_KEYS, RequestRecord

START_MARGIN_S = 0.05  # between telling every process the start time and that time


def default_client_processes() -> int:
    """min(4, the cores this process may run on)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cores)


async def send_one(client: Any, prompt: list[int], max_tokens: int, temperature: float, seed: int | None,
                   timeout: float | None) -> RequestRecord:
    """Stream one request and record what the client saw; errors are kept in the record, never raised."""
    rec = RequestRecord(prompt_len=len(prompt), max_tokens=max_tokens, start=time.perf_counter())
    try:
        stream = client.generate_stream(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                        ignore_eos=True, timeout=timeout)
        async with stream:
            async for delta in stream:
                if delta.token_ids:
                    rec.delta_times.append(time.perf_counter())
                    rec.num_output_tokens += len(delta.token_ids)
                if delta.timing is not None:
                    rec.server_ms = {k: getattr(delta.timing, k) for k in SERVER_KEYS}
                if (usage := getattr(delta, "usage", None)) is not None:
                    rec.cached_prompt_tokens = usage.cached_prompt_tokens
        rec.end = time.perf_counter()
        if rec.num_output_tokens != max_tokens:
            rec.error = f"got {rec.num_output_tokens} tokens, asked for {max_tokens} with ignore_eos"
    except Exception as exc:  # noqa: BLE001 - a benchmark reports failures instead of stopping at the first
        rec.error = f"{type(exc).__name__}: {exc}"
    return rec


@dataclass(frozen=True)
class Schedule:
    """Requests to send: request i at `t0 + offsets[i]` (perf_counter seconds), at most `max_concurrency`
    in flight (None: no cap)."""

    prompts: list[list[int]]
    out_lens: list[int]
    offsets: list[float]
    seeds: list[int | None]
    max_concurrency: int | None = None
    temperature: float = 0.0
    timeout: float | None = None

    def split(self, k: int) -> list[tuple[list[int], Schedule]]:
        """Up to k shares, request i in share i mod k, the concurrency cap divided between them (no share
        without requests or without room for one): [(indices in this schedule, share)]."""
        k = max(1, min(k, len(self.prompts), self.max_concurrency or k))
        shares = []
        for j in range(k):
            idx = list(range(j, len(self.prompts), k))
            cap = None if self.max_concurrency is None else self.max_concurrency // k + (j < self.max_concurrency % k)
            shares.append((idx, Schedule([self.prompts[i] for i in idx], [self.out_lens[i] for i in idx],
                                         [self.offsets[i] for i in idx], [self.seeds[i] for i in idx], cap,
                                         self.temperature, self.timeout)))
        return shares


async def run_schedule(client: Any, schedule: Schedule, t0: float,
                       on_done: Callable[[], None] = lambda: None) -> list[RequestRecord]:
    """Send every request at its time through `client` (an AsyncClient); records in schedule order."""
    gate = asyncio.Semaphore(schedule.max_concurrency) if schedule.max_concurrency else None
    s = schedule

    async def launch(i: int) -> RequestRecord:
        await asyncio.sleep(max(0.0, t0 + s.offsets[i] - time.perf_counter()))
        async with gate or contextlib.nullcontext():
            rec = await send_one(client, s.prompts[i], s.out_lens[i], s.temperature, s.seeds[i], s.timeout)
        on_done()
        return rec

    return list(await asyncio.gather(*(launch(i) for i in range(len(s.prompts)))))


def make_client(backend: str, target: str, timeout: float | None, api_key: str | None = None) -> Any:
    """The load generator's client: the gRPC SDK, or the same interface over the OpenAI HTTP API; `api_key`
    (None: `PDSERVE_API_KEY`) as both take it."""
    if backend == "openai":
        from cluster.bench.openai_client import OpenAIHttpClient

        return OpenAIHttpClient(target, timeout=timeout, api_key=api_key)
    from pdserve import AsyncClient

    return AsyncClient(target, timeout=timeout, api_key=api_key)


def _client_main(backend: str, target: str, timeout: float | None, conn: Connection, done: Any,
                 api_key: str | None) -> None:
    asyncio.run(_client_loop(backend, target, timeout, conn, done, api_key))


async def _client_loop(backend: str, target: str, timeout: float | None, conn: Connection, done: Any,
                       api_key: str | None) -> None:
    """One client process: connect, then per schedule: receive it, say so, wait for the start time, send it,
    return the records. End of file on the pipe (the parent is gone) or None ends it."""
    def count() -> None:
        with done.get_lock():
            done.value += 1

    try:
        async with make_client(backend, target, timeout, api_key) as client:
            await client.server_info()  # the connection exists before any timed request
            conn.send(("ready", None))
            while (schedule := await asyncio.to_thread(conn.recv)) is not None:
                conn.send(("loaded", None))
                t0 = await asyncio.to_thread(conn.recv)
                conn.send(("done", await run_schedule(client, schedule, t0, count)))
    except EOFError:
        return
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the run with it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ClientProcesses:
    """K spawned client processes, each with its own client (own connection) to `target` (`make_client`)."""

    def __init__(self, backend: str, target: str, k: int, timeout: float | None = None,
                 api_key: str | None = None) -> None:
        if k < 1:
            raise ValueError(f"client processes must be >= 1, got {k}")
        ctx = mp.get_context("spawn")
        self.done = ctx.Value("l", 0)  # requests finished by all processes (the progress bar)
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for _ in range(k):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_client_main, args=(backend, target, timeout, theirs, self.done, api_key),
                               daemon=True)
            proc.start()
            theirs.close()
            self._conns.append(mine)
            self._procs.append(proc)

    async def _expect(self, conns: list[Connection], kind: str) -> list[Any]:
        def receive(i: int, conn: Connection) -> Any:
            try:
                got, value = conn.recv()
            except EOFError:
                raise RuntimeError(f"bench client process {i} exited (code {self._procs[i].exitcode})") from None
            if got != kind:
                raise RuntimeError(f"bench client process {i}: {value if got == 'error' else got}")
            return value
        return list(await asyncio.gather(*(asyncio.to_thread(receive, i, c) for i, c in enumerate(conns))))

    async def start(self) -> None:
        """Wait until every process has connected; RuntimeError with the reason if one could not."""
        await self._expect(self._conns, "ready")

    async def run(self, schedule: Schedule, on_progress: Callable[[int], None] = lambda n: None
                  ) -> tuple[list[RequestRecord], float]:
        """Send `schedule` split over the processes; the records in schedule order and the common start time.
        `on_progress(n)` is called with the number of finished requests while it runs."""
        shares = schedule.split(len(self._conns))
        conns = self._conns[:len(shares)]
        with self.done.get_lock():
            self.done.value = 0
        for conn, (_, share) in zip(conns, shares, strict=True):
            conn.send(share)
        await self._expect(conns, "loaded")
        t0 = time.perf_counter() + START_MARGIN_S
        for conn in conns:
            conn.send(t0)
        collect = asyncio.ensure_future(self._expect(conns, "done"))
        while not collect.done():
            on_progress(self.done.value)
            await asyncio.wait([collect], timeout=0.2)
        on_progress(self.done.value)
        records: list[RequestRecord | None] = [None] * len(schedule.prompts)
        for (idx, _), recs in zip(shares, collect.result(), strict=True):
            for i, rec in zip(idx, recs, strict=True):
                records[i] = rec
        return [r for r in records if r is not None], t0

    async def close(self) -> None:
        """Tell every process to end and wait for it (killed if it does not)."""
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self._procs:
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.kill()
        for conn in self._conns:
            conn.close()
