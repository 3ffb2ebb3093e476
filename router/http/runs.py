"""The choices of one OpenAI request run as concurrent router requests, their messages merged in arrival order.

Each choice is one `Orchestrator.generate` stream read by its own task. `close()` cancels the tasks that
are still running, which closes their streams: the orchestrator's cleanup (cancel the worker calls, free
the blocks) runs as it does for a cancelled gRPC call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import grpc
from pdserve.v1 import generate_pb2 as pb

from router.errors import RouterError

log = logging.getLogger(__name__)

Stream = Callable[[pb.GenerateRequest], AsyncIterator[pb.GenerateResponse]]
Item = tuple[int, pb.GenerateResponse | RouterError | None]  # None: that choice's stream ended


class ChoiceRuns:
    """Runs `requests` through `stream` at once; `batches()` yields what has arrived, choice by choice."""

    def __init__(self, stream: Stream, requests: list[pb.GenerateRequest]) -> None:
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._pump(i, stream(r))) for i, r in enumerate(requests)]
        self._pending: list[Item] = []

    async def _pump(self, index: int, responses: AsyncIterator[pb.GenerateResponse]) -> None:
        try:
            async for msg in responses:
                self._queue.put_nowait((index, msg))
            self._queue.put_nowait((index, None))
        except RouterError as err:
            self._queue.put_nowait((index, err))
        except Exception as exc:  # a bug: answer 500 with it rather than hang the response
            log.exception("choice %d failed", index)
            self._queue.put_nowait((index, RouterError(grpc.StatusCode.INTERNAL,
                                                       f"router error: {type(exc).__name__}: {exc}")))
        finally:
            await responses.aclose()

    async def _next_batch(self) -> list[Item]:
        """At least one item: everything queued by now (one write per batch when streaming)."""
        batch = [await self._queue.get()]
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def started(self) -> None:
        """Wait until every choice has its first message; RouterError if one failed before it (so the caller
        can still answer with an HTTP error status)."""
        seen: set[int] = set()
        while len(seen) < len(self._tasks):
            for index, item in await self._next_batch():
                if isinstance(item, RouterError):
                    raise item
                seen.add(index)
                self._pending.append((index, item))

    async def batches(self) -> AsyncIterator[list[tuple[int, pb.GenerateResponse]]]:
        """Messages as they arrive, in batches; raises the first choice's RouterError."""
        done = 0
        while done < len(self._tasks):
            batch, self._pending = (self._pending, []) if self._pending else (await self._next_batch(), [])
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
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
