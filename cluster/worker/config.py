"""Worker configuration: frozen and validated; one per worker process."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.config import EngineConfig

ROLES = ("prefill", "decode", "colocated")  # colocated: prefill and decode in one engine, no KV transport
NO_TRANSPORT = "none"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # a worker given one binds and advertises its Ray node's IP (WorkerActor)


@dataclass(frozen=True)
class WorkerConfig:
    """A prefill, decode or colocated worker: its engine, KV transport, registry and timing knobs."""

    role: str
    engine: EngineConfig
    redis_url: str = field(repr=False)  # may carry the Redis password
    cluster_name: str = "default"
    worker_id: str = ""  # "" -> "<role>-<random>"
    transport: str = "gloo"  # resolved by the launcher ("auto" never reaches a worker); colocated: "none"
    host: str = "127.0.0.1"  # address to bind and advertise; a wildcard: the Ray node's IP (WorkerActor)
    heartbeat_s: float = 0.5
    max_queue: int = 512  # requests waiting in this worker beyond which it answers RESOURCE_EXHAUSTED
    kv_send_timeout_s: float = 30.0
    kv_stream_layers: bool = True  # prefill: send each layer's KV while the rest of the prompt computes
    # The engine thread holds the GIL for long stretches; a shorter switch interval than Python's 5 ms lets the
    # KV transfer threads take it between the engine's bytecodes (docs/benchmarks.md, `bench kv --receiver-busy`).
    gil_switch_interval_ms: float = 0.5
    cluster_secret: str = field(default="", repr=False)  # closes WorkerService, the KV channel, registry entries

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if not self.redis_url:
            raise ValueError("redis_url must be given")
        if self.transport == "auto":
            raise ValueError("resolve transport 'auto' before building a WorkerConfig")
        if (self.role == "colocated") != (self.transport == NO_TRANSPORT):
            raise ValueError(f"transport {NO_TRANSPORT!r} goes with role 'colocated' and only with it, got role "
                             f"{self.role!r} with transport {self.transport!r}")
        if self.heartbeat_s <= 0 or self.kv_send_timeout_s <= 0 or self.gil_switch_interval_ms <= 0:
            raise ValueError("heartbeat_s, kv_send_timeout_s and gil_switch_interval_ms must be positive")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")

    @property
    def registration_ttl_s(self) -> float:
        """How long the worker's registry entry lives without a heartbeat (three missed beats, at least 1 s)."""
        return max(3 * self.heartbeat_s, 1.0)
