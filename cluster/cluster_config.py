"""Cluster configuration for `pdserve up`, `python -m cluster.serve` and the Helm chart (one YAML schema)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.config import EngineConfig, EngineOptions
from cluster.config_schema import check_types
from cluster.worker.config import NO_TRANSPORT, WorkerConfig
from router.config import RouterConfig

TRANSPORTS = ("auto", "nccl", "gloo", "cuda_ipc", "grpc")
# The keys that are the router's own settings: their defaults and checks are RouterConfig's (one source), and
# `router_config` hands them on as they are.
ROUTER_KEYS = ("host", "cluster_name", "mode", "policy", "max_queue", "reserve_lease_ms", "queue_timeout_s",
               "migration_limit", "kv_failure_policy", "stream_idle_timeout_s", "api_keys", "tls_cert", "tls_key",
               "tls_client_ca")
_R = RouterConfig  # the defaults below that read `_R.x` are the router's
MAX_DEFAULT_ROUTER_PROCESSES = 4


def default_router_processes(cpus: int | None = None) -> int:
    """Router processes for a host of `cpus` cores (default: the cores this process may run on): a quarter of
    them, 1 to 4. The router host also runs Ray, Redis and often the workers' own processes (an engine loop
    and its server each), so the routers get a share, not the machine; past 4, measure (`bench serve`
    with `--client-processes`) before adding more."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(MAX_DEFAULT_ROUTER_PROCESSES, max(1, cpus // 4))


@dataclass(frozen=True)
class ClusterConfig:
    """A whole cluster: model, pools, transport, router and registry. `model=None`: the built-in tiny model.

    `mode="disaggregated"` runs `prefill` + `decode` workers and moves KV between them over `transport`;
    `mode="colocated"` runs `colocated` workers that each prefill and decode in one engine (no KV transport;
    `transport` is not used). `colocated=None` means `prefill + decode`: the same GPUs, so switching `mode`
    alone compares the two setups on identical hardware. Setting `colocated` in disaggregated mode is an error.

    `gpus_per_worker` below 1 packs several workers on one GPU (0.5: 1 prefill + 1 decode on one device, KV
    over cuda_ipc), each engine budgeting that share of the device's memory. `router_processes=None` sizes
    the router to the host (`default_router_processes`); more than one serve the same port (SO_REUSEPORT).
    """

    model: str | None = None
    device: str = "cpu"
    mode: str = _R.mode
    prefill: int = 1
    decode: int = 1
    colocated: int | None = None  # colocated mode only; None: prefill + decode
    transport: str = "auto"
    host: str = _R.host
    port: int = 50051  # router port; 0 picks a free one
    http_port: int | None = 8000  # the router's OpenAI-compatible HTTP API and /metrics; 0 picks one, null: off
    redis_url: str | None = field(default=None, repr=False)  # None: a private redis-server; may carry a password
    cluster_name: str = _R.cluster_name
    policy: str = _R.policy
    max_queue: int = _R.max_queue
    reserve_lease_ms: int = _R.reserve_lease_ms
    kv_stream_layers: bool = WorkerConfig.kv_stream_layers  # prefill workers stream KV layer by layer
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local Ray
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # in (0, 1]: below 1, workers share GPUs (and their memory) by that fraction
    router_processes: int | None = None  # None: default_router_processes() on the launching host
    engine: EngineOptions = field(default_factory=EngineOptions)
    queue_timeout_s: float = _R.queue_timeout_s  # longest wait for admission before RESOURCE_EXHAUSTED
    migration_limit: int = _R.migration_limit  # moves of one request off a worker lost mid-stream; 0: it fails
    kv_failure_policy: str = _R.kv_failure_policy  # a failed KV handoff is prefilled again once ("fail": ends it)
    stream_idle_timeout_s: float = _R.stream_idle_timeout_s  # a stream its client has not read this long is cut
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # public API keys; (): the port is open to all
    cluster_secret: str | None = field(default=None, repr=False)  # None: a fresh one per start (cluster.secret)
    tls_cert: str | None = None  # PEM files: TLS on the router's public gRPC and HTTP ports
    tls_key: str | None = None
    tls_client_ca: str | None = None  # mutual TLS: clients need a certificate this CA signed

    def __post_init__(self) -> None:
        if isinstance(self.api_keys, str) or not all(isinstance(k, str) and k for k in self.api_keys):
            raise ValueError("api_keys must be a list of non-empty strings")
        self.router_config(model_dir="-", redis_url="redis://-", secret="")  # the router's own checks
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.prefill < 1 or self.decode < 1:
            raise ValueError("need at least one prefill and one decode worker")
        if self.colocated is not None:
            if self.mode != "colocated":
                raise ValueError(f"colocated={self.colocated} is a worker count for mode 'colocated', "
                                 f"but mode is {self.mode!r}")
            if self.colocated < 1:
                raise ValueError(f"need at least one colocated worker, got colocated={self.colocated}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.transport in ("nccl", "cuda_ipc") and self.device != "cuda":
            raise ValueError(f"transport {self.transport!r} needs device 'cuda'")
        if self.cpus_per_worker <= 0:
            raise ValueError("cpus_per_worker must be positive")
        if not (0.0 < self.gpus_per_worker <= 1.0):
            raise ValueError(f"gpus_per_worker must be in (0, 1], got {self.gpus_per_worker}")
        if self.gpus_per_worker < 1.0 and self.transport == "nccl" and self.mode == "disaggregated":
            raise ValueError(f"transport 'nccl' cannot join two workers on one GPU (gpus_per_worker="
                             f"{self.gpus_per_worker}); use cuda_ipc, grpc or auto")
        if self.router_processes is not None and self.router_processes < 1:
            raise ValueError(f"router_processes must be >= 1, got {self.router_processes}")

    def worker_roles(self) -> list[str]:
        """The role of each worker to start, in placement-bundle order."""
        if self.mode == "colocated":
            return ["colocated"] * (self.colocated or self.prefill + self.decode)
        return ["prefill"] * self.prefill + ["decode"] * self.decode

    def num_gpus(self) -> int:
        """Whole GPUs the workers occupy: floor(1 / gpus_per_worker) workers fit on each."""
        per_gpu = int(1.0 / self.gpus_per_worker + 1e-9)
        return math.ceil(len(self.worker_roles()) / per_gpu)

    def num_router_processes(self) -> int:
        """`router_processes`, or the default for the host this runs on."""
        return self.router_processes or default_router_processes()

    def router_config(self, model_dir: str, redis_url: str, secret: str, reuse_port: bool = False) -> RouterConfig:
        """The router's config: its keys from this file, the cluster's model, Redis and secret."""
        return RouterConfig(model_dir=model_dir, redis_url=redis_url, port=self.port, http_port=self.http_port,
                            reuse_port=reuse_port, max_model_len=self.engine.max_model_len, cluster_secret=secret,
                            **{**{k: getattr(self, k) for k in ROUTER_KEYS}, "api_keys": tuple(self.api_keys)})

    def worker_config(self, role: str, index: int, model_dir: str, redis_url: str, transport: str, host: str,
                      secret: str) -> WorkerConfig:
        """Worker `index`'s config (its engine seeded by its index; `transport` resolved, `host` its node's)."""
        return WorkerConfig(role=role, engine=self.engine_config(model_dir, seed=index), redis_url=redis_url,
                            cluster_name=self.cluster_name, worker_id=f"{role}-{index}", transport=transport,
                            host=host, kv_stream_layers=self.kv_stream_layers, cluster_secret=secret)

    def engine_config(self, model_dir: str, seed: int) -> EngineConfig:
        """A worker's engine: the `engine:` options on this cluster's device, with its share of the GPU."""
        return EngineConfig(model=model_dir, device=self.device, seed=seed, device_share=self.gpus_per_worker,
                            **self.engine.options())

    def resolved_transport(self, one_host: bool = False) -> str:
        """The KV transport, with "auto" resolved: on GPUs "cuda_ipc" when `one_host` (every worker on one
        machine and CUDA IPC usable there: the sender copies straight into the receiver's blocks on the copy
        engine, no receiver SMs, 2 control messages; a 2K handoff in ~1 ms against nccl's ~2 ms,
        docs/benchmarks.md), else "nccl" (within and across hosts; "grpc" where workers share GPUs, which NCCL
        refuses); gloo (the same torch.distributed code) on CPU. "none" in colocated mode, where no KV moves
        between workers."""
        if self.mode == "colocated":
            return NO_TRANSPORT
        if self.transport != "auto":
            return self.transport
        if self.device != "cuda":
            return "gloo"
        if one_host:
            return "cuda_ipc"
        return "nccl" if self.gpus_per_worker == 1.0 else "grpc"  # nccl cannot join two ranks on one GPU

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "cluster config") -> ClusterConfig:
        """Built from parsed YAML: unknown keys and values of the wrong type are errors naming `where`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        check_types(cls, data, where)
        engine = data.get("engine") or {}
        if not isinstance(engine, dict):
            raise ValueError(f"{where}: `engine` must be a mapping of engine options, got {engine!r}")
        eknown = {f.name for f in dataclasses.fields(EngineOptions)}
        if set(engine) - eknown:
            raise ValueError(f"{where}: unknown engine keys {sorted(set(engine) - eknown)}; known: {sorted(eknown)}")
        check_types(EngineOptions, engine, f"{where}, engine")
        try:
            return cls(**{**data, "engine": EngineOptions(**engine)})
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterConfig:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ValueError(f"--config {path}: cannot read it ({e.strerror})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"{path}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(data, where=str(path))

    def replace(self, **changes: Any) -> ClusterConfig:
        """A copy with the given non-None fields changed (CLI flags over the file)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})
