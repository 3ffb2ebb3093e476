"""What the engine hands back: per-step deltas and whole finished requests."""

from __future__ import annotations

from dataclasses import dataclass, field

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
FINISH_PREFILLED = "prefilled"  # prefill-only request done; its KV waits for export


@dataclass
class StepOutput:
    """New tokens of one request from one engine step."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None
    num_cached_tokens: int = 0
    kv_block_ids: list[int] | None = None  # finish "prefilled": the blocks holding the prompt's KV (held)


@dataclass
class RequestOutput:
    """A finished request, as `LLM.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_cached_tokens: int = 0
    logprobs: list[dict[int, float]] = field(default_factory=list)
