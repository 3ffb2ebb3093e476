"""The Ray actor that hosts one worker (one GPU each; Ray's logical GPUs place CPU workers the same way)."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os

from cluster.worker.config import WILDCARD_HOSTS, WorkerConfig
from cluster.worker.server import WorkerServer


def load_servicer(path: str) -> type:
    """The servicer class named "package.module:Class" (a role's; see `cluster.launcher.ROLE_SERVICERS`)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class WorkerActor:
    """Async Ray actor, the worker's engine process: its event loop runs the role's servicer, the engine has its
    own thread, and the gRPC front end its own process. `servicer` names the role's servicer class."""

    def __init__(self, config: WorkerConfig, servicer: str) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if config.engine.device == "cuda" and os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"):
            import ray
            import torch

            gpu = int(ray.get_gpu_ids()[0])  # all GPUs are visible: use the one Ray assigned
            torch.cuda.set_device(gpu)
            config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, device=f"cuda:{gpu}"))
        if config.host in WILDCARD_HOSTS:
            # Kubernetes (the router on 0.0.0.0): bind and advertise the IP of the node this actor runs on, which
            # the router and the peers can reach; resolved here, so a worker the supervisor starts again on
            # the node that replaced a lost one (another IP) advertises that one.
            import ray

            config = dataclasses.replace(config, host=ray.util.get_node_ip_address())
        if config.engine.device == "cpu":
            import torch

            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.server = WorkerServer(config, load_servicer(servicer))

    async def start(self) -> dict[str, str]:
        """Start serving; the worker's id, address, role and engine process id (for `bench soak`'s kills and RSS)."""
        address = await self.server.start()
        return {"worker_id": self.server.worker_id, "address": address, "role": self.server.config.role,
                "pid": str(os.getpid())}

    async def stats(self) -> dict[str, int]:
        assert self.server.loop is not None
        return dict(self.server.loop.stats.__dict__)

    async def drain(self, timeout_s: float = 30.0) -> None:
        await self.server.drain(timeout_s)

    async def stop(self) -> None:
        await self.server.stop()
