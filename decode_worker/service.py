"""The decode role: reserve blocks for KV that a prefill worker will push, then decode the request in the
continuous batch and stream its tokens. A reservation is freed when its lease runs out before Decode
starts, when the KV does not arrive in time, on cancel, and when the stream ends for any reason."""

from __future__ import annotations

import asyncio
import time

from pdserve.v1 import worker_pb2 as wpb

from cluster.registry import AsyncRegistry
from cluster.transport import KVReceiver, create_receiver
from cluster.wire import sampling_from_proto
from cluster.worker.config import WorkerConfig
from cluster.worker.engine_loop import EngineLoop
from cluster.worker.service_base import WorkerError, WorkerServicerBase


class DecodeServicer(WorkerServicerBase):
    transport: KVReceiver

    def __init__(self, config: WorkerConfig, worker_id: str, loop: EngineLoop) -> None:
        super().__init__(config, worker_id, loop)
        self._leases: dict[str, tuple[asyncio.TimerHandle, float]] = {}  # request id -> (expiry timer, deadline)

    @classmethod
    async def create(cls, config: WorkerConfig, worker_id: str, loop: EngineLoop,
                     registry: AsyncRegistry) -> DecodeServicer:
        servicer = cls(config, worker_id, loop)
        receiver = servicer.open_transport(create_receiver)
        servicer.endpoint = await asyncio.to_thread(receiver.listen)
        return servicer

    async def _free_reservation(self, rid: str) -> bool:
        """Stop expecting KV for `rid` (waits out a write in progress) and give its blocks back."""
        await self.blocking(self.transport.forget, rid)
        return await self.loop.acall(lambda e: e.release_reservation(rid))

    def _expire(self, rid: str) -> None:
        if self._leases.pop(rid, None) is not None:
            asyncio.ensure_future(self._free_reservation(rid))

    async def Reserve(self, request: wpb.ReserveRequest) -> wpb.ReserveReply:
        rid, n = request.request_id, request.num_tokens
        if n < 1 or request.lease_ms < 1:
            raise WorkerError("INVALID_ARGUMENT", "num_tokens and lease_ms must be >= 1")
        try:
            blocks = self.loop.reserve(rid, n)  # thread-safe: no wait for the engine's current step
        except ValueError as e:
            raise WorkerError("ALREADY_EXISTS", str(e)) from None
        if blocks is None:
            raise WorkerError("RESOURCE_EXHAUSTED", f"decode worker {self.worker_id} has no room for {n} tokens of KV")
        self.transport.expect(rid, blocks)
        lease_s = request.lease_ms / 1e3
        timer = asyncio.get_running_loop().call_later(lease_s, self._expire, rid)
        self._leases[rid] = (timer, time.monotonic() + lease_s)
        return wpb.ReserveReply(block_ids=blocks, transport=self.transport.name, transport_endpoint=self.endpoint,
                                worker_id=self.worker_id)

    async def Decode(self, request: wpb.DecodeRequest) -> wpb.DecodeReply:
        """Wait for the KV, then join the running batch; the tokens go to the router's stream."""
        rid = request.request_id
        lease = self._leases.pop(rid, None)
        if lease is None:
            raise WorkerError("NOT_FOUND", f"no live reservation for request {rid}")
        lease[0].cancel()
        t0 = time.perf_counter()
        try:
            params = sampling_from_proto(request.sampling)
            await self.blocking(self.transport.wait_received, rid, max(0.0, lease[1] - time.monotonic()))
        except ValueError as e:
            await self._free_reservation(rid)
            raise WorkerError("INVALID_ARGUMENT", str(e)) from None
        except (TimeoutError, KeyError) as e:
            await self._free_reservation(rid)
            raise WorkerError("DEADLINE_EXCEEDED", f"KV for {rid} did not arrive: {e}") from None
        except asyncio.CancelledError:
            await self._free_reservation(rid)
            raise
        kv_wait_ms = (time.perf_counter() - t0) * 1e3
        prompt, first, n_out = list(request.token_ids), request.first_token_id, request.num_output_tokens

        def add(engine):  # ValueError inside releases the reservation (see add_prefilled_request)
            engine.add_prefilled_request(rid, prompt, first, params, num_output_tokens=n_out)

        await self.start_routed(rid, request.router_id, add)
        return wpb.DecodeReply(kv_wait_ms=kv_wait_ms)

    async def Cancel(self, request: wpb.CancelRequest) -> wpb.CancelReply:
        lease = self._leases.pop(request.request_id, None)
        freed = False
        if lease is not None:
            lease[0].cancel()
            freed = await self._free_reservation(request.request_id)
        reply = await super().Cancel(request)
        reply.found = reply.found or freed
        return reply
