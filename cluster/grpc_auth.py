"""The cluster secret on gRPC (`cluster.secret`): the server guard of internal services and the client
interceptors that add the worker token to every call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from cluster.secret import METADATA_KEY, metadata_value, same, worker_token


def refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that aborts every call with `code`, without decoding the request."""
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, details)
        yield  # pragma: no cover - never reached: abort raises

    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    kind = (handler.request_streaming, handler.response_streaming)
    return make[kind](stream if kind[1] else unary)


class TokenGuard(grpc.aio.ServerInterceptor):
    """Server side: every call must carry `METADATA_KEY` equal to `token` (constant-time), else UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_service(self, continuation: Callable[..., Any],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        given = metadata_value(details.invocation_metadata, METADATA_KEY)
        if handler is None or (given is not None and same(given, self._token)):
            return handler
        return refusing(handler, grpc.StatusCode.UNAUTHENTICATED, "this internal service needs the cluster secret")


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata[METADATA_KEY] = token
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


class _AioUnaryToken(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        return await continuation(_with_token(details, self._token), request)


class _AioStreamToken(grpc.aio.UnaryStreamClientInterceptor):  # grpc.aio files an interceptor under one kind
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        return await continuation(_with_token(details, self._token), request)


def aio_interceptors(secret: str) -> list[Any]:
    """Client interceptors for a grpc.aio channel to a worker: each call carries the worker token."""
    return [_AioUnaryToken(worker_token(secret)), _AioStreamToken(worker_token(secret))] if secret else []


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._metadata = ((METADATA_KEY, token),)

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=tuple(details.metadata or ()) + self._metadata)

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


def worker_channel(address: str, secret: str) -> grpc.Channel:
    """A blocking channel to a worker's WorkerService whose calls carry the worker token (tools, tests)."""
    return grpc.intercept_channel(grpc.insecure_channel(address), _SyncToken(worker_token(secret)))
