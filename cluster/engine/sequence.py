"""A request inside the engine: its tokens, KV blocks and progress."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cluster.sampling_params import SamplingParams
from cluster.tokenizer import IncrementalDetokenizer


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """Token ids are prompt + generated; `num_computed_tokens` of them have KV in the cache."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    prefill_only: bool = False
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at the first prefill
    num_hashed_blocks: int = 0  # leading blocks registered in the prefix cache
    finish_reason: str | None = None
    detokenizer: IncrementalDetokenizer | None = None
    text_emitted: int = 0  # characters of detokenizer.text already returned
    logprobs: list[dict[int, float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_new_tokens(self) -> int:
        """Tokens the next forward must compute (all uncomputed ones)."""
        return len(self.token_ids) - self.num_computed_tokens
