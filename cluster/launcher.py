"""Bring a cluster up: Ray (connect or start), Redis (given or private), the worker pools, the router.

`Cluster.start(config)` returns a running cluster; `shutdown()` drains and stops every part it started.
The router runs in this process; with `router_processes` N > 1, N - 1 more run in child processes
(`router.process`) on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from cluster import preflight, stop_signals
from cluster.builtin_model import ensure_builtin_model
from cluster.cluster_config import ClusterConfig
from cluster.kv_trace import ENV as KV_TRACE_ENV
from cluster.kv_trace import trace_dir
from cluster.redis_server import RedisServer
from cluster.registry import PASSWORD_ENV as REDIS_PASSWORD_ENV
from cluster.registry import url_with_password
from cluster.secret import ENV as SECRET_ENV
from cluster.secret import new_secret
from cluster.supervisor import RedisSupervisor, WorkerSupervisor
from cluster.worker.config import WorkerConfig
from router.process import RouterProcess
from router.server import RouterServer, serve

log = logging.getLogger(__name__)

# Each role's servicer ("module:Class"), handed to the worker host, which never imports the roles itself.
ROLE_SERVICERS = {
    "prefill": "prefill_worker.service:PrefillServicer",
    "decode": "decode_worker.service:DecodeServicer",
    "colocated": "cluster.worker.colocated_service:ColocatedServicer",
}


@dataclass
class Cluster:
    config: ClusterConfig
    model_dir: str
    redis_url: str = field(repr=False)  # carries the Redis password
    router: RouterServer  # the one in this process; `router_processes` serve the same port beside it
    router_processes: list[RouterProcess] = field(default_factory=list)
    workers: list[Any] = field(default_factory=list)  # Ray actor handles
    worker_info: list[dict[str, str]] = field(default_factory=list)
    placement_group: Any = None
    redis: RedisServer | None = None
    started_ray: bool = False
    supervisor: RedisSupervisor | None = None  # restarts the private redis-server if it dies
    worker_supervisor: WorkerSupervisor | None = None  # replaces dead workers
    secret: str = field(default="", repr=False)  # the cluster secret (cluster.secret)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.router.port}"

    @property
    def http_url(self) -> str | None:
        """The router's HTTP API base (`http://host:port`), None without one."""
        port = self.router.http_port
        return None if port is None else f"http://{self.config.host}:{port}"

    @functools.cached_property
    def transport(self) -> str:
        """The workers' KV transport: the config's, "auto" resolved for where Ray placed them (cuda_ipc needs
        every worker on one node, cupy, and caches that CUDA IPC can export: no expandable segments)."""
        import importlib.util

        from ray.util import placement_group_table

        nodes = set(placement_group_table(self.placement_group)["bundles_to_node_id"].values())
        ipc_ok = (importlib.util.find_spec("cupy") is not None
                  and "expandable_segments:true" not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").lower())
        return self.config.resolved_transport(one_host=len(nodes) == 1 and ipc_ok)

    @classmethod
    async def start(cls, config: ClusterConfig, progress: bool = True) -> Cluster:
        preflight.check(config)  # before anything starts (with SO_REUSEPORT a second bind would not even fail)
        import ray
        from ray.util.placement_group import placement_group

        say = print if progress else (lambda *a, **k: None)
        n_routers = config.num_router_processes()
        model_dir = config.model or str(ensure_builtin_model())
        started_ray = False
        if not ray.is_initialized():
            address = config.ray_address or os.environ.get("RAY_ADDRESS")
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                n = len(config.worker_roles())
                gpus = None if config.device == "cuda" else config.num_gpus()  # logical GPUs place CPU workers
                # "local": a private Ray even where `ray start` left an address in /tmp/ray/ray_current_cluster
                ray.init(address="local", num_cpus=max(2, int(n * config.cpus_per_worker) + 1), num_gpus=gpus,
                         include_dashboard=False, log_to_driver=False)
            started_ray = True
            stop_signals.reclaim()  # ray.init takes SIGTERM (exit, or abort in its C++ handler)
        preflight.check_ray_fits(config, ray.cluster_resources())  # else the placement group waits in vain
        secret = config.cluster_secret or os.environ.get(SECRET_ENV) or new_secret()  # env: the Helm chart's
        if not config.api_keys:
            say(f"pdserve: no API key (--api-key): the public port {config.host}:{config.port} is open to anyone "
                "who can reach it")
        redis = None
        redis_url = config.redis_url
        if redis_url and os.environ.get(REDIS_PASSWORD_ENV):  # the Helm chart's, from a Secret
            redis_url = url_with_password(redis_url, os.environ[REDIS_PASSWORD_ENV])
        if not redis_url:
            redis = RedisServer(password=new_secret()).start()
            redis_url = redis.url
            say(f"pdserve: started redis-server at {redis.host}:{redis.port} (password required)")
        bundles = [{"GPU": config.gpus_per_worker, "CPU": config.cpus_per_worker}] * len(config.worker_roles())
        pg = placement_group(bundles, strategy="PACK")
        try:
            await asyncio.wait_for(pg.ready(), timeout=120)
        except TimeoutError:
            raise RuntimeError(f"Ray could not place {len(bundles)} workers ({config.gpus_per_worker:g} GPU + "
                               f"{config.cpus_per_worker:g} CPU each): {ray.available_resources()}") from None
        router = await serve(config.router_config(model_dir, redis_url, secret, reuse_port=n_routers > 1))
        cluster = cls(config, model_dir, redis_url, router, placement_group=pg, redis=redis, started_ray=started_ray,
                      supervisor=RedisSupervisor(redis).start() if redis is not None else None, secret=secret)
        try:
            await cluster._start_router_processes(n_routers - 1)
            await cluster._start_workers()
        except BaseException:
            await cluster.shutdown()
            raise
        say(f"pdserve: router on {cluster.address} ({n_routers} process{'es' if n_routers > 1 else ''}), "
            f"{cluster.describe_workers()}")
        return cluster

    async def _start_router_processes(self, n: int) -> None:
        """`n` more routers in child processes, on the port the first one bound (so port 0 works too)."""
        child_cfg = dataclasses.replace(self.router.config, port=self.router.port, http_port=self.router.http_port)
        self.router_processes = [RouterProcess(child_cfg) for _ in range(n)]
        ports = await asyncio.gather(*(p.wait_ready() for p in self.router_processes), return_exceptions=True)
        for port in ports:
            if isinstance(port, BaseException):
                raise port

    def describe_workers(self) -> str:
        """E.g. "1 prefill + 1 decode workers, transport gloo" or "2 colocated workers (no KV transport)"."""
        roles = self.config.worker_roles()
        if self.config.mode == "colocated":
            return f"{len(roles)} colocated workers (no KV transport)"
        return (f"{roles.count('prefill')} prefill + {roles.count('decode')} decode workers, "
                f"transport {self.transport}")

    def _worker_config(self, role: str, index: int) -> WorkerConfig:
        """Worker `index`'s config; with a wildcard `host` (0.0.0.0, as in Kubernetes, where the router must
        listen on all interfaces) the worker binds and advertises its own Ray node's IP (WorkerActor)."""
        return self.config.worker_config(role, index, self.model_dir, self.redis_url, self.transport,
                                         self.config.host, self.secret)

    async def _start_workers(self) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from cluster.worker.actor import WorkerActor

        roles = self.config.worker_roles()
        env = {"OMP_NUM_THREADS": str(max(1, int(self.config.cpus_per_worker))), "RAY_DEDUP_LOGS": "0"}
        if trace := trace_dir():  # handoff timelines (cluster.kv_trace)
            env[KV_TRACE_ENV] = trace
        if self.transport == "cuda_ipc":
            # CUDA IPC opens the peer's memory, so every GPU must stay visible; each worker then picks its own
            # GPU by the id Ray assigned (see WorkerActor).
            env["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
        actor_cls = ray.remote(WorkerActor)

        def new_worker(i: int) -> Any:
            """Worker i's actor on its bundle (again, when the supervisor replaces a dead one)."""
            strategy = PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i)
            return actor_cls.options(
                num_gpus=self.config.gpus_per_worker, num_cpus=self.config.cpus_per_worker,
                scheduling_strategy=strategy, runtime_env={"env_vars": env}, max_concurrency=1000,
            ).remote(self._worker_config(roles[i], i), ROLE_SERVICERS[roles[i]])

        self.workers.extend(new_worker(i) for i in range(len(roles)))
        t0 = time.perf_counter()
        self.worker_info = list(await asyncio.gather(*(w.start.remote() for w in self.workers)))
        log.info("workers up in %.1fs: %s", time.perf_counter() - t0, self.worker_info)
        await self.wait_until_serving(timeout_s=30)
        self.worker_supervisor = WorkerSupervisor(self.workers, self.worker_info, new_worker).start()

    async def wait_until_serving(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while not await self.router.update_health():
            if time.monotonic() > end:
                raise RuntimeError(f"the router did not see the workers ({self.describe_workers()}) in the registry "
                                   "in time")
            await asyncio.sleep(0.1)

    async def shutdown(self, drain_s: float = 10.0) -> None:
        """Stop the routers, drain and stop the workers, then Redis and Ray if this cluster started them."""
        import ray

        if self.worker_supervisor is not None:
            await self.worker_supervisor.stop()
        with contextlib.suppress(Exception):
            await asyncio.gather(self.router.stop(grace=2.0), *(p.stop() for p in self.router_processes),
                                 return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(w.drain.remote(drain_s) for w in self.workers),
                                                  return_exceptions=True), drain_s + 5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(w.stop.remote() for w in self.workers),
                                                  return_exceptions=True), 15)
        for w in self.workers:
            with contextlib.suppress(Exception):
                ray.kill(w)
        if self.placement_group is not None:
            with contextlib.suppress(Exception):
                ray.util.remove_placement_group(self.placement_group)
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.redis is not None:
            self.redis.stop()
        if self.started_ray:
            ray.shutdown()
