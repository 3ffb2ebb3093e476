"""The prefill role: run prompts (batched by the engine with other requests), sample the first token,
push the prompt's KV into the decode worker's reservation, then free the blocks here.

The KV goes through the transport's send stream. By default it streams out layer by layer during the
forward that completes the prompt (the engine calls the stream after each layer), so only the last chunk
and the receiver's answer remain once the prefill ends; with `kv_stream_layers` off it all goes at the end."""

from __future__ import annotations

import time

from pdserve.v1 import worker_pb2 as wpb

from cluster.engine.outputs import FINISH_PREFILLED
from cluster.registry import AsyncRegistry
from cluster.transport import KVSender, TransportError, create_sender
from cluster.wire import logprobs_to_proto, sampling_from_proto
from cluster.worker.config import WorkerConfig
from cluster.worker.engine_loop import EngineLoop
from cluster.worker.service_base import WorkerError, WorkerServicerBase
from prefill_worker.destinations import DecodeDestinations


class PrefillServicer(WorkerServicerBase):
    transport: KVSender
    destinations: DecodeDestinations

    @classmethod
    async def create(cls, config: WorkerConfig, worker_id: str, loop: EngineLoop,
                     registry: AsyncRegistry) -> PrefillServicer:
        servicer = cls(config, worker_id, loop)
        servicer.open_transport(create_sender)
        servicer.destinations = DecodeDestinations(registry, config.registration_ttl_s)
        return servicer

    async def Prefill(self, request: wpb.PrefillRequest) -> wpb.PrefillReply:
        rid = request.request_id
        try:
            params = sampling_from_proto(request.sampling)
        except ValueError as e:
            raise WorkerError("INVALID_ARGUMENT", str(e)) from None
        dest = request.dest
        if not dest.block_ids:  # at once, not after a whole forward: there is nowhere to put the KV
            raise WorkerError("INVALID_ARGUMENT", "no KV destination blocks given")
        if dest.transport and dest.transport != self.transport.name:
            raise WorkerError("FAILED_PRECONDITION",
                              f"decode worker speaks {dest.transport!r}, this prefill worker {self.transport.name!r}")
        await self._check_destination(dest)
        tokens = list(request.token_ids)
        stream = None
        if dest.block_ids:
            try:
                stream = await self.blocking(self.transport.open_send, dest.transport_endpoint, rid,
                                             list(dest.block_ids), self.config.kv_send_timeout_s)
            except TransportError as e:
                raise WorkerError("ABORTED", f"KV handoff to {dest.worker_id} failed: {e}") from None

        def add(engine):
            engine.add_request(rid, tokens, params, prefill_only=True, num_output_tokens=request.num_output_tokens)
            if stream is not None and self.config.kv_stream_layers:  # layer by layer, while the prefill runs
                engine.stream_kv(rid, stream)

        t_submit = time.perf_counter()
        first = None
        delivered = False
        try:
            async for timed in self.run_request(rid, add):
                first = timed
            assert first is not None
            out = first.output
            t_done = time.perf_counter()
            handoff_ms, kv_bytes = 0.0, 0
            if out.finish_reason == FINISH_PREFILLED:
                src = out.kv_block_ids or []  # with the output: asking the engine would wait out its next step
                if len(src) != len(dest.block_ids):
                    raise WorkerError("INVALID_ARGUMENT",
                                      f"destination has {len(dest.block_ids)} blocks, the prompt needs {len(src)}")
                assert stream is not None  # opened for every destination with blocks
                try:
                    delivered = True  # finish() ends the stream either way (without streaming: one send)
                    await self.blocking(stream.finish, src)
                except TransportError as e:
                    raise WorkerError("ABORTED", f"KV handoff to {dest.worker_id} failed: {e}") from None
                handoff_ms = (time.perf_counter() - t_done) * 1e3  # what the prefill did not hide
                kv_bytes = len(src) * self.loop.engine.kv_layout.bytes_per_block
        finally:
            if stream is not None and not delivered:  # cancelled, failed, or the first token ended it
                self.submit_blocking(stream.abort)
            self.loop.call(lambda e: e.release_prefilled(rid))
        token = out.new_token_ids[0]
        ended = out.finish_reason != FINISH_PREFILLED  # else the decode worker owns all the text
        reply = wpb.PrefillReply(
            first_token_id=token, worker_id=self.worker_id,
            finish_reason=out.finish_reason if ended else "", text=out.text_delta if ended else "",
            timing=wpb.PrefillTiming(queue_ms=(first.step_started - t_submit) * 1e3,
                                     prefill_ms=(t_done - first.step_started) * 1e3,
                                     kv_handoff_ms=handoff_ms, num_cached_tokens=out.num_cached_tokens,
                                     kv_bytes=kv_bytes))
        if out.logprobs:
            reply.first_logprobs.CopyFrom(logprobs_to_proto(token, out.logprobs[0]))
        return reply

    async def _check_destination(self, dest: wpb.KVDestination) -> None:
        """PERMISSION_DENIED unless `dest` is a registered decode worker's KV endpoint (the caller is known, but
        this worker connects only to its cluster's peers); UNAVAILABLE if the registry cannot say."""
        try:
            why = await self.destinations.refusal(dest)
        except Exception as e:
            raise WorkerError("UNAVAILABLE", f"cannot check the KV destination, the registry is unreachable: {e}") \
                from None
        if why:
            raise WorkerError("PERMISSION_DENIED", why)
