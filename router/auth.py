"""The router's public API keys and request guard, for the gRPC server (an interceptor) and HTTP (a middleware).

With keys set, a call must carry `authorization: Bearer KEY` (compared in constant time with every key); else
gRPC answers UNAUTHENTICATED and HTTP 401 with an OpenAI error object. Health checks stay open (gRPC health,
HTTP /health), and so does /metrics (as vLLM's --api-key); reflection needs a key like the API. Keys are
never logged. The gRPC guard also decodes GenerateService requests itself, so that an undecodable or
truncated message is INVALID_ARGUMENT instead of grpc's UNKNOWN/INTERNAL, and one larger than any valid
request (`router.validation.max_request_bytes`) is INVALID_ARGUMENT without being parsed: grpc.aio runs the
parse on the event loop, where megabytes of it would stall every other stream.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from pdserve._request import API_KEY_ENV

from cluster.grpc_auth import refusing
from cluster.secret import metadata_value, same
from router.http.errors import ApiError

ENV = API_KEY_ENV
_OPEN_GRPC = "/grpc.health.v1.Health/"
_OPEN_HTTP = ("/health", "/metrics")


def load_api_keys(keys: Sequence[str] = (), key_file: str | None = None) -> tuple[str, ...]:
    """The keys given as flags, plus one per non-empty line of `key_file`, else `PDSERVE_API_KEY`."""
    found = [k.strip() for k in keys if k.strip()]
    if key_file:
        found += [line.strip() for line in Path(key_file).read_text().splitlines() if line.strip()]
    if not found and os.environ.get(ENV, "").strip():
        found = [os.environ[ENV].strip()]
    return tuple(found)


class ApiKeys:
    """The accepted keys; empty: every caller is let in."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = tuple(k.encode() for k in keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None) -> bool:
        """Whether an `authorization` header value carries one of the keys (constant time per key)."""
        if not self._keys:
            return True
        scheme, _, given = (authorization or "").partition(" ")
        ok = False
        for key in self._keys:  # no early exit: the time does not say which key, nor how close
            ok |= same(given.strip().encode(), key)
        return ok and scheme.lower() == "bearer"

    def http_middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        @web.middleware
        async def check(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
            if request.path not in _OPEN_HTTP and not self.allows(request.headers.get("Authorization")):
                raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                               "invalid_request_error", code="invalid_api_key")
            return await handler(request)

        return check


class _Refused:
    """Stands in for a request whose bytes were not parsed, or did not parse; says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _decoding(handler: grpc.RpcMethodHandler, max_bytes: int) -> grpc.RpcMethodHandler:
    """`handler` (unary request) with its request parsed here: bad bytes, or more than `max_bytes` of them,
    abort with INVALID_ARGUMENT."""
    parse = handler.request_deserializer

    def safe_parse(data: bytes) -> Any:
        if len(data) > max_bytes:
            return _Refused(f"a request of {len(data)} bytes is larger than any valid one ({max_bytes} at most)")
        try:
            return parse(data)
        except Exception:  # noqa: BLE001 - any decode failure is the caller's bad message
            return _Refused("the request is not a valid protobuf message")

    async def check(request: Any, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, _Refused):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)

    if handler.response_streaming:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(request, context)
            return await handler.unary_stream(request, context)  # the servicer writes with context.write

        return grpc.unary_stream_rpc_method_handler(stream, safe_parse, handler.response_serializer)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check(request, context)
        return await handler.unary_unary(request, context)

    return grpc.unary_unary_rpc_method_handler(unary, safe_parse, handler.response_serializer)


class PublicGuard(grpc.aio.ServerInterceptor):
    """Keys on every method but health; safe decoding of at most `max_request_bytes` on the methods of `service`."""

    def __init__(self, keys: ApiKeys, service: str, max_request_bytes: int) -> None:
        self._keys = keys
        self._prefix = f"/{service}/"
        # Each method's decoding handler, built once: grpc's handler constructors import a module per call.
        self._decoded: dict[str, grpc.RpcMethodHandler] = {}
        self._max_bytes = max_request_bytes

    async def intercept_service(self, continuation: Callable[..., Any],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_GRPC):
            return handler
        if not self._keys.allows(metadata_value(details.invocation_metadata, "authorization")):
            return refusing(handler, grpc.StatusCode.UNAUTHENTICATED,
                            "invalid or missing API key: send 'authorization: Bearer KEY' metadata")
        if details.method.startswith(self._prefix) and not handler.request_streaming:
            decoded = self._decoded.get(details.method)
            if decoded is None:
                decoded = self._decoded[details.method] = _decoding(handler, self._max_bytes)
            return decoded
        return handler
