"""The choices of one OpenAI request run as concurrent router requests, their messages merged in arrival order.

Each choice is one `Orchestrator.generate` stream filling a shared `router.client_stream.Outbox` from a task
of its own (what the client has not taken yet waits there, each choice's deltas merged). `close()` cancels
the tasks that are still running, which closes their streams: the orchestrator's cleanup (cancel the worker
calls, free the blocks) runs as it does for a cancelled gRPC call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from pdserve.v1 import generate_pb2 as pb

from router.client_stream import Entry, Outbox, stop_filling
from router.errors import RouterError

Stream = Callable[[pb.GenerateRequest], AsyncIterator[pb.GenerateResponse]]


class ChoiceRuns:
    """Runs `requests` through `stream` at once; `batches()` yields what has arrived, choice by choice."""

    def __init__(self, stream: Stream, requests: list[pb.GenerateRequest]) -> None:
        self._outbox = Outbox()
        self._tasks = [asyncio.create_task(self._outbox.fill(i, stream(r))) for i, r in enumerate(requests)]
        self._pending: list[Entry] = []

    async def started(self) -> None:
        """Wait until every choice has its first message; RouterError if one failed before it (so the caller
        can still answer with an HTTP error status)."""
        seen: set[int] = set()
        while len(seen) < len(self._tasks):
            for index, item in await self._outbox.take():
                if isinstance(item, RouterError):
                    raise item
                seen.add(index)
                self._pending.append((index, item))

    async def batches(self) -> AsyncIterator[list[tuple[int, pb.GenerateResponse]]]:
        """Messages as they arrive, in batches (one write each when streaming); raises the first choice's
        RouterError."""
        done = 0
        while done < len(self._tasks):
            batch, self._pending = (self._pending, []) if self._pending else (await self._outbox.take(), [])
            out = []
            for index, item in batch:
                if isinstance(item, RouterError):
                    raise item
                if item is None:
                    done += 1
                else:
                    out.append((index, item))
            if out:
                yield out

    async def close(self) -> None:
        await asyncio.gather(*(stop_filling(task) for task in self._tasks))
