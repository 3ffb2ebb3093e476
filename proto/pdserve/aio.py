"""Asynchronous pdserve client on grpc.aio: `await AsyncClient(target).generate(...)`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc

from pdserve._health import health_modules
from pdserve._request import Accumulator, ClientBase, Security, build_request
from pdserve.errors import DeadlineExceededError, from_rpc_error
from pdserve.types import GenerateDelta, GenerateResult, ServerInfo
from pdserve.v1 import generate_pb2 as pb


class AsyncGenerateStream:
    """Async iterator over the deltas of one Generate call; leaving early (`break`, `aclose()`,
    `async with`, or dropping it) cancels the RPC. `await result()` drains it into a GenerateResult."""

    def __init__(self, call: Any, acc: Accumulator) -> None:
        self._call = call
        self._acc = acc
        self._done = False

    def __aiter__(self) -> AsyncGenerateStream:
        return self

    async def __anext__(self) -> GenerateDelta:
        if self._done:
            raise StopAsyncIteration
        try:
            msg = await self._call.read()
        except grpc.RpcError as err:
            self._done = True
            raise from_rpc_error(err) from None
        except asyncio.CancelledError:
            self.close()
            raise
        if msg is grpc.aio.EOF:
            self._done = True
            raise StopAsyncIteration
        return self._acc.add(msg)

    async def result(self) -> GenerateResult:
        async for _ in self:
            pass
        return self._acc.result()

    def close(self) -> None:
        """Cancel the call if it is still running (idempotent)."""
        if not self._done:
            self._done = True
            self._call.cancel()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter or loop shutdown: nothing useful to do
            self.close()


class AsyncClient(ClientBase):
    """grpc.aio client for a pdserve router; same API (and keys, TLS) as `Client`, with coroutines."""

    def __init__(self, target: str, timeout: float | None = None,
                 options: Sequence[tuple[str, Any]] | None = None, *, api_key: str | None = None,
                 tls: bool = False, root_certificates: bytes | None = None, private_key: bytes | None = None,
                 certificate_chain: bytes | None = None) -> None:
        super().__init__(target, timeout, options, grpc.aio,
                         Security(api_key, tls, root_certificates, private_key, certificate_chain))

    def generate_stream(self, prompt: str | Sequence[int], *, max_tokens: int = 16, temperature: float = 1.0,
                        top_k: int = -1, top_p: float = 1.0, seed: int | None = None,
                        stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
                        ignore_eos: bool = False, logprobs: int | None = None, request_id: str | None = None,
                        model: str = "", timeout: float | None = None) -> AsyncGenerateStream:
        """Start a generation; `async for delta in stream` (the last delta is final)."""
        req = build_request(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
                            logprobs=logprobs, request_id=request_id, model=model)
        acc = Accumulator()
        call = self._stub.Generate(req, timeout=self._timeout(timeout), metadata=self._metadata)
        return AsyncGenerateStream(call, acc)

    async def generate(self, prompt: str | Sequence[int], *, max_tokens: int = 16, temperature: float = 1.0,
                       top_k: int = -1, top_p: float = 1.0, seed: int | None = None,
                       stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
                       ignore_eos: bool = False, logprobs: int | None = None, request_id: str | None = None,
                       model: str = "", timeout: float | None = None) -> GenerateResult:
        """Generate and wait for the whole result; raises a PdserveError subclass on failure."""
        stream = self.generate_stream(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                      top_p=top_p, seed=seed, stop=stop, stop_token_ids=stop_token_ids,
                                      ignore_eos=ignore_eos, logprobs=logprobs, request_id=request_id,
                                      model=model, timeout=timeout)
        async with stream:
            return await stream.result()

    async def server_info(self, timeout: float | None = None) -> ServerInfo:
        try:
            reply = await self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self._timeout(timeout),
                                              metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return ServerInfo.from_proto(reply)

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        """Standard gRPC health check: "SERVING", "NOT_SERVING" or "SERVICE_UNKNOWN"."""
        health_pb2, health_pb2_grpc = health_modules()
        try:
            reply = await health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self._timeout(timeout) or 10.0)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def wait_until_serving(self, timeout: float = 60.0, poll_s: float = 0.1) -> None:
        """Poll health until SERVING; DeadlineExceededError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = await self.health(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
                last = str(exc)
            await asyncio.sleep(poll_s)
        raise DeadlineExceededError(f"{self.target} not SERVING after {timeout}s (last: {last})")

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
