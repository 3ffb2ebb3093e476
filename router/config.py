"""Router configuration: a frozen dataclass validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

POLICIES = ("round_robin", "least_loaded", "prefix_aware")  # prompt placement; the registry's `place` runs them

MODES = ("disaggregated", "colocated")  # colocated: one worker prefills and decodes each request
KV_FAILURE_POLICIES = ("recompute", "fail")


@dataclass(frozen=True)
class RouterConfig:
    """Everything the router needs. Timeouts are in seconds unless the name says `_ms`.

    `max_queue` caps the requests in this router, running or waiting for admission (`router.admission`);
    beyond it requests fail at once with RESOURCE_EXHAUSTED (0 rejects everything, which is useful for
    draining); a request that waits longer than `queue_timeout_s` is refused the same way.
    `stream_idle_timeout_s` ends a stream whose client has not read it for that long (a write that its flow
    control holds up; 60 s, nginx's `send_timeout`): CANCELLED over gRPC, the connection closed over HTTP.
    `max_model_len=None` reads it from the model directory (config.json `max_position_embeddings`, else
    tokenizer_config `model_max_length`).

    `migration_limit`: how many times one request may move to another decode (or colocated) worker when
    its worker becomes unreachable mid-stream, or hangs (no token for `decode_chunk_timeout_s`); the prompt
    and the tokens already sent are prefilled again there and the client's stream goes on (0: such requests
    fail UNAVAILABLE). `kv_failure_policy`: when the
    KV handoff fails (the push failed, or the KV did not arrive in time), "recompute" runs the request's
    prefill once more, preferring another prefill worker, into a fresh reservation; "fail" ends the request
    with the handoff's status.
    """

    model_dir: str
    redis_url: str = field(repr=False)  # may carry the Redis password
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port (see RouterServer.port)
    reuse_port: bool = False  # SO_REUSEPORT: several router processes serve this port (router.process)
    http_port: int | None = None  # OpenAI-compatible HTTP and /metrics; None: none, 0: pick a free port
    cluster_name: str = "default"
    served_model_name: str | None = None  # None: the model directory's name
    mode: str = "disaggregated"  # which workers serve: prefill + decode pools, or colocated workers
    policy: str = "least_loaded"
    max_queue: int = 1024
    max_model_len: int | None = None
    reserve_lease_ms: int = 30_000  # how long a decode reservation waits for the KV and the Decode call
    reserve_timeout_s: float = 5.0  # decode worker's Reserve RPC
    prefill_timeout_s: float = 60.0  # Prefill RPC (queue + prefill + KV push; lease-capped); colocated: 1st token
    decode_first_token_timeout_s: float = 60.0  # Decode call -> its first chunk
    decode_chunk_timeout_s: float = 60.0  # longest gap between later chunks
    cancel_timeout_s: float = 2.0  # best-effort Cancel RPCs on cleanup
    max_decode_attempts: int = 3  # decode workers tried when one refuses the reservation or is down
    max_prefill_attempts: int = 2  # prefill (or colocated) workers tried when one is unreachable
    prefix_ttl_s: float = 300.0  # how long a prefill worker is assumed to keep a prompt's blocks cached
    prefix_load_slack: int = 8  # prefix_aware: prefer the cache holder unless it has this much more load
    health_interval_s: float = 1.0  # registry poll for the health status
    queue_timeout_s: float = 10.0  # longest wait for admission (router.admission) before RESOURCE_EXHAUSTED
    prefill_slots_per_worker: int = 8  # requests per prefill worker between decode reservation and prefill end
    migration_limit: int = 1  # moves of one request off workers lost mid-stream (0: off)
    kv_failure_policy: str = "recompute"  # a failed KV handoff: "recompute" (once per request) or "fail"
    stream_idle_timeout_s: float = 60.0  # a client that takes no write for this long is cut off (router.client_stream)
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # public API keys (router.auth); (): open
    cluster_secret: str = field(default="", repr=False)  # WorkerService token, registry signatures (cluster.secret)
    tls_cert: str | None = None  # PEM files: TLS on the public gRPC and HTTP ports
    tls_key: str | None = None
    tls_client_ca: str | None = None  # mutual TLS: clients must present a certificate this CA signed

    @property
    def serving_roles(self) -> tuple[str, ...]:
        """The worker roles that must be registered to serve; the first one runs the prompts (the policy's)."""
        return ("colocated",) if self.mode == "colocated" else ("prefill", "decode")

    def __post_init__(self) -> None:
        if not self.model_dir:
            raise ValueError("model_dir must be given")
        if not self.redis_url:
            raise ValueError("redis_url must be given")
        if not (0 <= self.port <= 65535):
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.http_port is not None and not (0 <= self.http_port <= 65535):
            raise ValueError(f"http_port must be in [0, 65535], got {self.http_port}")
        if not self.cluster_name or "{" in self.cluster_name or "}" in self.cluster_name:
            raise ValueError(f"cluster_name must be non-empty and free of braces, got {self.cluster_name!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.reserve_lease_ms < 1:
            raise ValueError(f"reserve_lease_ms must be >= 1, got {self.reserve_lease_ms}")
        for name in ("reserve_timeout_s", "prefill_timeout_s", "decode_first_token_timeout_s",
                     "decode_chunk_timeout_s", "cancel_timeout_s", "prefix_ttl_s", "health_interval_s",
                     "queue_timeout_s", "stream_idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_decode_attempts < 1 or self.max_prefill_attempts < 1:
            raise ValueError("max_decode_attempts and max_prefill_attempts must be >= 1")
        if self.migration_limit < 0:
            raise ValueError(f"migration_limit must be >= 0, got {self.migration_limit}")
        if self.kv_failure_policy not in KV_FAILURE_POLICIES:
            raise ValueError(f"kv_failure_policy must be one of {KV_FAILURE_POLICIES}, got {self.kv_failure_policy!r}")
        if self.prefill_slots_per_worker < 1:
            raise ValueError(f"prefill_slots_per_worker must be >= 1, got {self.prefill_slots_per_worker}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.prefix_load_slack < 0:
            raise ValueError(f"prefix_load_slack must be >= 0, got {self.prefix_load_slack}")
