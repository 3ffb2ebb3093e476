"""The public endpoints: gRPC GenerateService, standard health (SERVING once the cluster has at least one
prefill and one decode worker; in colocated mode, one colocated worker) and reflection, on grpc.aio; with
`http_port`, the OpenAI-compatible HTTP endpoint (`router.http`) on the same event loop and request path.
API keys, safe request decoding (`router.auth`) and TLS (`router.tls`) apply to both ports."""

from __future__ import annotations

import asyncio
import logging

import grpc
from pdserve import __version__
from pdserve.v1 import generate_pb2 as pb
from pdserve.v1 import generate_pb2_grpc as pb_grpc

from cluster.registry import AsyncRegistry
from router.auth import ApiKeys, PublicGuard
from router.channels import WorkerChannels
from router.client_stream import Outbox, StreamIdle, stop_filling, write_or_idle
from router.colocated import ColocatedOrchestrator
from router.config import RouterConfig
from router.errors import RouterError
from router.http.server import HttpServer
from router.metrics import RouterMetrics
from router.model_info import ModelInfo
from router.orchestrator import Orchestrator
from router.policy import make_policy
from router.tls import grpc_credentials, http_ssl_context
from router.validation import max_request_bytes

try:  # the GPU image lacks these: add grpcio-health-checking/-reflection == grpcio's version to its bundle
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
except ImportError as exc:
    raise ImportError(f"the router needs grpcio-health-checking=={grpc.__version__}: {exc}") from exc
try:
    from grpc_reflection.v1alpha import reflection
except ImportError:  # optional: only tools like grpcurl use it
    reflection = None

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerateService"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# gRPC core sheds calls that arrived but that this event loop has not taken up yet once more than 1,000 wait
# (at random up to 3,000, then all), ending them with a bare CANCELLED; every call must reach admission
# (router.admission), which refuses with RESOURCE_EXHAUSTED and the limit's name instead.
PENDING_CALLS = [("grpc.server.max_pending_requests", 1 << 16),
                 ("grpc.server.max_pending_requests_hard_limit", 1 << 16)]
# Calls beyond what admission can hold are refused by grpc itself (RESOURCE_EXHAUSTED "Concurrent RPC limit
# exceeded!") before they cost this event loop a handler: when more arrive than the loop can take up, gRPC core
# keeps the rest pending and after 30 s (grpc.server_max_unrequested_time_in_server) cancels them, a bare
# CANCELLED. The headroom keeps room for health checks and reflection next to a full queue.
CONTROL_RPC_HEADROOM = 64


class GenerateServicer(pb_grpc.GenerateServiceServicer):
    """Thin gRPC adapter over the Orchestrator: statuses out of RouterErrors, cleanup on cancel, a stream its
    client does not read ended with CANCELLED naming stream_idle_timeout_s."""

    def __init__(self, orchestrator: Orchestrator, metrics: RouterMetrics) -> None:
        self.orch = orchestrator
        self.metrics = metrics
        self.stream_idle_timeout_s = orchestrator.config.stream_idle_timeout_s

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        # The first response is awaited here: a refusal (a full router, a bad request) is answered without a
        # task. The rest fill the outbox from a task of their own (`router.client_stream`) while this coroutine
        # writes them with context.write. When the client cancels, grpc cancels this coroutine, and the
        # fill's cancel (or the aclose below) runs the orchestrator's cleanup right away.
        responses = self.metrics.track(self.orch.generate(request, context.time_remaining))
        outbox = Outbox()
        filling: asyncio.Task[None] | None = None
        try:
            if await outbox.put_next(0, responses):
                filling = asyncio.ensure_future(outbox.fill(0, responses))
            while True:
                for _, item in await outbox.take():
                    if item is None:
                        return
                    if isinstance(item, RouterError):
                        await context.abort(item.code, item.reason)
                    if not await self._write(context, item):
                        return  # the client is gone: cancelled, or its deadline passed; cleanup is below
        except StreamIdle as idle:
            # The client's window stays full. The write in flight stays queued in grpc's core: a client that
            # reads again gets it, then this status.
            log.info("Generate(%s): %s", request.request_id, idle.reason)
            if filling is not None:
                await stop_filling(filling)  # frees the request on its workers now
            context.set_code(grpc.StatusCode.CANCELLED)
            context.set_details(idle.reason)
        finally:
            if filling is None:
                await responses.aclose()
            else:
                await stop_filling(filling)

    async def _write(self, context: grpc.aio.ServicerContext, msg: pb.GenerateResponse) -> bool:
        """Send one response; False if the call has already ended: a client cancel or deadline can reach grpc's
        core before it reaches this handler, and the write then fails (ExecuteBatchError) instead. StreamIdle
        if the client leaves it unread for stream_idle_timeout_s."""
        try:
            await write_or_idle(context.write(msg), self.stream_idle_timeout_s)
        except grpc.aio.BaseError as exc:
            log.debug("Generate: write after the call ended (%s: %s)", type(exc).__name__, exc)
            return False
        return True

    async def GetServerInfo(self, request: pb.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        orch, model = self.orch, self.orch.model
        try:
            workers = await orch.reg(orch.registry.list_workers())
        except RouterError as err:
            await context.abort(err.code, err.reason)
        roles = orch.config.serving_roles  # colocated mode: ("colocated",), which counts as both pools
        prefill = [w for w, _ in workers if w.role == roles[0]]
        decode = [w for w, _ in workers if w.role == roles[-1]]
        sizes = {w.block_size for w in decode + prefill}
        return pb.ServerInfo(
            model=model.name, max_model_len=model.max_model_len, vocab_size=model.vocab_size,
            num_prefill_workers=len(prefill), num_decode_workers=len(decode),
            transport=",".join(sorted({w.transport for w in decode})), mode=orch.config.mode,
            policy=orch.policy.name, block_size=sizes.pop() if len(sizes) == 1 else 0, version=__version__)


class RouterServer:
    """A running router; `port` is the bound port (useful with `RouterConfig.port=0`), `http_port` the HTTP
    endpoint's (None without one)."""

    def __init__(self, config: RouterConfig, server: grpc.aio.Server, port: int, orchestrator: Orchestrator,
                 health_servicer: health.aio.HealthServicer, metrics: RouterMetrics) -> None:
        self.config = config
        self.server = server
        self.port = port
        self.orchestrator = orchestrator
        self.metrics = metrics
        self.http: HttpServer | None = None
        self._health = health_servicer
        self._health_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.serving = False

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    async def update_health(self) -> bool:
        """Poll the registry once, refreshing the orchestrator's worker view; SERVING iff a worker of each
        role the mode needs is live (prefill and decode, or colocated)."""
        try:
            roles = {w.role for w, _ in await self.orchestrator.view.refresh()}
            serving = set(self.config.serving_roles) <= roles
        except Exception as exc:  # noqa: BLE001 - Redis down: not serving, keep polling
            log.warning("health: registry unavailable: %s", exc)
            serving = False
        if serving != self.serving:
            log.info("health: %s", "SERVING" if serving else "NOT_SERVING")
        self.serving = serving
        for service in ("", SERVICE_NAME):
            await self._health.set(service, _SERVING if serving else _NOT_SERVING)
        return serving

    async def _health_loop(self) -> None:
        while not self._stopping:  # as well as the cancel: a registry call can swallow one
            await asyncio.sleep(self.config.health_interval_s)
            await self.update_health()

    async def start(self) -> None:
        await self.server.start()
        if self.config.http_port is not None:
            http = HttpServer(self.orchestrator, self.metrics, lambda: self.serving, self.config.host,
                              self.config.http_port, ApiKeys(self.config.api_keys), http_ssl_context(self.config))
            try:
                await http.start()
            except RuntimeError:
                await self.server.stop(None)
                raise
            self.http = http
        await self.update_health()
        self._health_task = asyncio.create_task(self._health_loop())

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting requests, let running ones finish for `grace` seconds, then release everything."""
        self._stopping = True
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.wait({self._health_task})
        await self._health.enter_graceful_shutdown()
        await asyncio.gather(self.server.stop(grace), *([self.http.stop()] if self.http is not None else []))
        await self.orchestrator.close()
        await self.orchestrator.channels.close()
        await self.orchestrator.registry.aclose()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def serve(config: RouterConfig) -> RouterServer:
    """Build and start a router; ValueError for a bad model directory, RuntimeError if the port is taken."""
    model = ModelInfo.load(config.model_dir, config.served_model_name, config.max_model_len)
    registry = AsyncRegistry(config.redis_url, config.cluster_name, secret=config.cluster_secret)
    flow = ColocatedOrchestrator if config.mode == "colocated" else Orchestrator
    orchestrator = flow(config, model, registry, WorkerChannels(config.cluster_secret),
                        make_policy(config.policy, config.prefix_load_slack))
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(config.reuse_port)), *PENDING_CALLS],
                             interceptors=[PublicGuard(ApiKeys(config.api_keys), SERVICE_NAME,
                                                       max_request_bytes(model))],
                             maximum_concurrent_rpcs=config.max_queue + CONTROL_RPC_HEADROOM)
    metrics = RouterMetrics(model.name)
    pb_grpc.add_GenerateServiceServicer_to_server(GenerateServicer(orchestrator, metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection is not None:
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server)
    else:
        log.warning("grpcio-reflection is not installed: serving without reflection")
    try:
        creds = grpc_credentials(config)
        address = f"{config.host}:{config.port}"
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError as exc:
        await registry.aclose()
        raise RuntimeError(f"router cannot bind {config.host}:{config.port}: {exc}") from None
    router = RouterServer(config, server, port, orchestrator, health_servicer, metrics)
    try:
        await router.start()
    except RuntimeError:
        await registry.aclose()
        raise
    log.info("router on %s (HTTP %s, %s, %s): model %s, %s mode, policy %s, cluster %s", router.address,
             router.http_port, "TLS" if creds else "plaintext", "API keys" if config.api_keys else "no API key",
             model.name, config.mode, config.policy, config.cluster_name)
    return router
