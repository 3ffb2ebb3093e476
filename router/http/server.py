"""The OpenAI-compatible HTTP endpoint of the router (aiohttp, on the router's event loop beside grpc.aio).

Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `GET /health` (200 once the
cluster can serve, else 503), `GET /metrics` (Prometheus). The socket is bound with SO_REUSEPORT so that
several router processes can serve one port. A client that disconnects cancels its request's handler, and
with it the request on every worker.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from router.auth import ApiKeys
from router.http.chat_template import ChatTemplate
from router.http.completions import Completions, dumps
from router.http.errors import ApiError
from router.metrics import RouterMetrics
from router.orchestrator import Orchestrator

log = logging.getLogger(__name__)
SHUTDOWN_TIMEOUT_S = 5.0  # how long stop() lets running requests finish


def _error(err: ApiError) -> web.Response:
    return web.Response(status=err.status, text=dumps(err.body()), content_type="application/json",
                        headers=err.headers)


@web.middleware
async def _errors(request: web.Request,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every failure as an OpenAI error object."""
    try:
        return await handler(request)
    except ApiError as err:
        return _error(err)
    except web.HTTPException as exc:  # unknown route, wrong method
        if exc.status < 400:
            raise
        return _error(ApiError(exc.status, f"{exc.reason}: {request.method} {request.path}"))
    except (ConnectionResetError, asyncio.CancelledError):
        raise  # the client is gone
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        return _error(ApiError(500, f"router error: {type(exc).__name__}: {exc}", "internal_error"))


class HttpServer:
    """A running HTTP endpoint; `port` is the bound port (useful with port 0)."""

    def __init__(self, orchestrator: Orchestrator, metrics: RouterMetrics, is_serving: Callable[[], bool],
                 host: str, port: int, keys: ApiKeys | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.orch, self.metrics, self.host, self.port = orchestrator, metrics, host, port
        self._ssl = ssl_context
        self._is_serving = is_serving
        self._created = int(time.time())
        completions = Completions(orchestrator, metrics, ChatTemplate.load(orchestrator.config.model_dir))
        guard = [keys.http_middleware()] if keys else []
        app = web.Application(middlewares=[_errors, *guard], client_max_size=completions.max_body + 1)
        app.router.add_post("/v1/completions", completions.completions)
        app.router.add_post("/v1/chat/completions", completions.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=SHUTDOWN_TIMEOUT_S)

    async def start(self) -> None:
        """Bind and serve; RuntimeError if the port cannot be bound."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_port=True, ssl_context=self._ssl)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise RuntimeError(f"router cannot bind HTTP {self.host}:{self.port}: {exc}") from None
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def models(self, request: web.Request) -> web.Response:
        model = self.orch.model
        card = {"id": model.name, "object": "model", "created": self._created, "owned_by": "pdserve",
                "root": model.name, "parent": None, "max_model_len": model.max_model_len}
        return web.Response(text=dumps({"object": "list", "data": [card]}), content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        """200 while the registry has the workers the mode needs (the gRPC health's SERVING), else 503."""
        if self._is_serving():
            return web.Response(text="{}", content_type="application/json")
        return _error(ApiError(503, "no serving workers registered yet", "service_unavailable"))

    async def prometheus(self, request: web.Request) -> web.Response:
        try:
            workers = await self.orch.registry.list_workers()
        except Exception as exc:  # noqa: BLE001 - Redis down: the router's own series still scrape
            log.warning("metrics: registry unavailable: %s", exc)
            workers = []
        text = await asyncio.to_thread(self.metrics.exposition, workers)
        return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})
