"""The engine's side of a prefill/decode KV hand-off: the blocks that live outside any running sequence.

- prefill side: a finished prefill-only request keeps its blocks (`prefilled_blocks`) until the KV has been
  sent (`release_prefilled`); `stream` has its KV handed to a sink layer by layer during the forward that
  completes its prompt;
- decode side: `reserve` blocks for KV that will be written from outside, then `claim` them for the
  sequence that decodes from it, or `release_reservation`.

`KVHandoff` makes every block-manager call for those blocks. It is not thread-safe by itself: `LLMEngine`
calls it under its `state_lock` wherever another thread may be at work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Protocol

from cluster.engine.block_manager import BlockManager
from cluster.engine.outputs import FINISH_ABORT, FINISH_PREFILLED, StepOutput
from cluster.engine.scheduler import ScheduledBatch
from cluster.engine.sequence import Sequence


class LayerSink(Protocol):
    """Receives a prefill's KV layer by layer (a KV transport's send stream)."""

    def layers_ready(self, src_block_ids: list[int], upto: int) -> None: ...


class KVHandoff:
    """Held prefills, reservations and layer sinks of one engine, by request id."""

    def __init__(self, block_manager: BlockManager) -> None:
        self._blocks = block_manager
        self._prefilled: dict[str, Sequence] = {}
        self._reservations: dict[str, list[int]] = {}
        self._sinks: dict[str, LayerSink] = {}

    # ---- prefill side ------------------------------------------------------------------------------
    def stream(self, request_id: str, sink: LayerSink) -> None:
        """Send the KV of prefill-only request `request_id` to `sink` as the prompt's last forward runs."""
        self._sinks[request_id] = sink

    def layer_hook(self, batch: ScheduledBatch) -> Callable[[int], None] | None:
        """The per-layer call for the requests whose prompt `batch` completes and whose KV streams out."""
        if not self._sinks or not batch.is_prefill:
            return None
        sinks = [(seq.block_table, self._sinks[seq.request_id]) for seq, n in zip(batch.seqs, batch.num_tokens,
                 strict=True) if seq.request_id in self._sinks and seq.num_computed_tokens + n >= len(seq)]
        if not sinks:
            return None

        def on_layer(layer: int) -> None:
            for blocks, sink in sinks:
                sink.layers_ready(blocks, layer + 1)

        return on_layer

    def on_finish(self, seq: Sequence, out: StepOutput) -> bool:
        """`seq` just finished: stop streaming its KV. A prefill-only request keeps its blocks until
        `release_prefilled` (finish "prefilled": their ids go out on `out` at once) and True is returned;
        False: the caller frees the sequence as usual."""
        self._sinks.pop(seq.request_id, None)
        if not seq.prefill_only or seq.finish_reason in (None, FINISH_ABORT):
            return False
        if seq.finish_reason == FINISH_PREFILLED:
            out.kv_block_ids = list(seq.block_table)
        self._prefilled[seq.request_id] = seq
        return True

    def prefilled_blocks(self, request_id: str) -> tuple[list[int], int]:
        """Block ids and token count of a held prefill's KV (KeyError if none is held)."""
        seq = self._prefilled[request_id]
        return list(seq.block_table), seq.num_computed_tokens

    def release_prefilled(self, request_id: str) -> bool:
        """Free a held prefill's blocks; False if none is held under that id."""
        seq = self._prefilled.pop(request_id, None)
        if seq is None:
            return False
        self._blocks.free_sequence(seq)
        return True

    # ---- decode side -------------------------------------------------------------------------------
    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Blocks for `num_tokens` tokens of KV written from outside; None if they don't fit. ValueError if
        `request_id` already holds a reservation."""
        if request_id in self._reservations:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self._blocks.blocks_needed(num_tokens) > self._blocks.num_free_blocks:
            return None
        blocks = self._blocks.allocate_blocks(num_tokens)
        self._reservations[request_id] = blocks
        return blocks

    def release_reservation(self, request_id: str) -> bool:
        """Give a reservation's blocks back; False if there is none under that id."""
        blocks = self._reservations.pop(request_id, None)
        if blocks is None:
            return False
        self._blocks.release_blocks(blocks)
        return True

    @contextmanager
    def claim(self, request_id: str, num_tokens: int) -> Iterator[list[int]]:
        """Take a reservation's blocks for a sequence whose first `num_tokens` tokens have their KV in them.
        ValueError if there is no reservation or it is not the size those tokens need; the blocks go back to
        the free list then, and also if the body raises (the sequence could not be made)."""
        blocks = self._reservations.pop(request_id, None)
        if blocks is None:
            raise ValueError(f"no reservation for request {request_id!r}")
        try:
            needed = self._blocks.blocks_needed(num_tokens)
            if needed != len(blocks):
                raise ValueError(f"reservation has {len(blocks)} blocks, the prompt needs {needed}")
            yield blocks
        except Exception:
            self._blocks.release_blocks(blocks)
            raise

    @property
    def reservations(self) -> Mapping[str, list[int]]:
        """The blocks of each open reservation (read-only)."""
        return MappingProxyType(self._reservations)

    # ---- both --------------------------------------------------------------------------------------
    def abort(self, request_id: str) -> bool:
        """Drop everything held for `request_id` and free its blocks; False if nothing was held."""
        self._sinks.pop(request_id, None)
        return self.release_prefilled(request_id) | self.release_reservation(request_id)

    def holds(self, request_id: str) -> bool:
        """Whether `request_id` has a held prefill or a reservation."""
        return request_id in self._prefilled or request_id in self._reservations

    @property
    def num_reserved_blocks(self) -> int:
        return sum(len(b) for b in self._reservations.values())

    @property
    def num_prefilled(self) -> int:
        return len(self._prefilled)

    def block_tables(self) -> list[list[int]]:
        """The block ids of every held prefill and reservation (for the block manager's invariant check)."""
        return [s.block_table for s in self._prefilled.values()] + list(self._reservations.values())
