"""Synchronous pdserve client: `Client(target).generate(...)` over a gRPC channel."""

from __future__ import annotations

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


class GenerateStream:
    """Iterator over the deltas of one Generate call.

    Leaving it early (`break`, `close()`, the `with` block, or dropping it) cancels the RPC, which the
    router sees as a client cancel. After exhaustion, `result()` returns the whole GenerateResult.
    """

    def __init__(self, call: Any, acc: Accumulator) -> None:
        self._call = call
        self._acc = acc
        self._done = False

    def __iter__(self) -> GenerateStream:
        return self

    def __next__(self) -> GenerateDelta:
        if self._done:
            raise StopIteration
        try:
            msg = next(self._call)
        except StopIteration:
            self._done = True
            raise
        except grpc.RpcError as err:
            self._done = True
            raise from_rpc_error(err) from None
        return self._acc.add(msg)

    def result(self) -> GenerateResult:
        """Drain the remaining deltas and return the full result."""
        for _ in self:
            pass
        return self._acc.result()

    def close(self) -> None:
        """Cancel the call if it is still running (idempotent)."""
        if not self._done:
            self._done = True
            self._call.cancel()

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter or loop shutdown: nothing useful to do
            self.close()


class Client(ClientBase):
    """Blocking client for a pdserve router. `timeout` (seconds) is the default deadline of each call;
    `api_key` (default: `PDSERVE_API_KEY`) and TLS as `pdserve._request.Security` says."""

    def __init__(self, target: str, timeout: float | None = None,
                 options: Sequence[tuple[str, Any]] | None = None, *, api_key: str | None = None,
                 tls: bool = False, root_certificates: bytes | None = None, private_key: bytes | None = None,
                 certificate_chain: bytes | None = None) -> None:
        super().__init__(target, timeout, options, grpc,
                         Security(api_key, tls, root_certificates, private_key, certificate_chain))

    def generate_stream(self, prompt: str | Sequence[int], *, max_tokens: int = 16, temperature: float = 1.0,
                        top_k: int = -1, top_p: float = 1.0, seed: int | None = None,
                        stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
                        ignore_eos: bool = False, logprobs: int | None = None, request_id: str | None = None,
                        model: str = "", timeout: float | None = None) -> GenerateStream:
        """Start a generation; iterate the returned stream for GenerateDelta pieces (the last is final)."""
        req = build_request(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
                            logprobs=logprobs, request_id=request_id, model=model)
        acc = Accumulator()
        return GenerateStream(self._stub.Generate(req, timeout=self._timeout(timeout), metadata=self._metadata), acc)

    def generate(self, prompt: str | Sequence[int], *, max_tokens: int = 16, temperature: float = 1.0,
                 top_k: int = -1, top_p: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
                 ignore_eos: bool = False, logprobs: int | None = None, request_id: str | None = None,
                 model: str = "", timeout: float | None = None) -> GenerateResult:
        """Generate and wait for the whole result; raises a PdserveError subclass on failure."""
        with self.generate_stream(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                  top_p=top_p, seed=seed, stop=stop, stop_token_ids=stop_token_ids,
                                  ignore_eos=ignore_eos, logprobs=logprobs, request_id=request_id,
                                  model=model, timeout=timeout) as stream:
            return stream.result()

    def server_info(self, timeout: float | None = None) -> ServerInfo:
        try:
            reply = self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self._timeout(timeout),
                                              metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return ServerInfo.from_proto(reply)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """Standard gRPC health check: "SERVING", "NOT_SERVING" or "SERVICE_UNKNOWN"."""
        health_pb2, health_pb2_grpc = health_modules()
        try:
            reply = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self._timeout(timeout) or 10.0)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_until_serving(self, timeout: float = 60.0, poll_s: float = 0.1) -> None:
        """Poll health until SERVING; DeadlineExceededError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
                last = str(exc)
            time.sleep(poll_s)
        raise DeadlineExceededError(f"{self.target} not SERVING after {timeout}s (last: {last})")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
