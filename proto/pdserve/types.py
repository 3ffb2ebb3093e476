"""Plain result types of the SDK, built from the pdserve.v1 protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.v1 import generate_pb2 as pb


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprob of one generated token and the top candidates (token id, logprob), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    @classmethod
    def from_proto(cls, m: pb.TokenLogprobs) -> TokenLogprobs:
        return cls(m.token_id, m.logprob, tuple((t.token_id, t.logprob) for t in m.top))


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0

    @classmethod
    def from_proto(cls, m: pb.Usage) -> Usage:
        return cls(m.prompt_tokens, m.completion_tokens, m.cached_prompt_tokens)


@dataclass(frozen=True)
class Timing:
    """Server-side time breakdown in milliseconds (see generate.proto)."""

    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    kv_handoff_ms: float = 0.0
    first_decode_step_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    placement_ms: float = 0.0  # the router's part of queue_ms (validation, placement, decode reservation)

    @classmethod
    def from_proto(cls, m: pb.Timing) -> Timing:
        return cls(m.queue_ms, m.prefill_ms, m.kv_handoff_ms, m.first_decode_step_ms, m.ttft_ms, m.total_ms,
                   m.placement_ms)


@dataclass(frozen=True)
class GenerateDelta:
    """One streamed piece: new tokens and text. The last one has `finish_reason`, `usage` and `timing`."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    timing: Timing | None = None
    prefill_worker: str = ""
    decode_worker: str = ""
    num_migrations: int = 0  # times the router moved the request to other workers after a failure

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class GenerateResult:
    """A finished generation. `ttft_s` and `total_s` are measured by the client."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    timing: Timing
    logprobs: list[TokenLogprobs] | None
    ttft_s: float | None
    total_s: float
    prefill_worker: str = ""
    decode_worker: str = ""  # after a migration: the workers it finished on
    num_migrations: int = 0  # times the router moved the request to other workers after a failure


@dataclass(frozen=True)
class ServerInfo:
    model: str
    max_model_len: int
    vocab_size: int
    num_prefill_workers: int
    num_decode_workers: int
    transport: str
    mode: str
    policy: str
    block_size: int
    version: str

    @classmethod
    def from_proto(cls, m: pb.ServerInfo) -> ServerInfo:
        return cls(m.model, m.max_model_len, m.vocab_size, m.num_prefill_workers, m.num_decode_workers,
                   m.transport, m.mode, m.policy, m.block_size, m.version)
