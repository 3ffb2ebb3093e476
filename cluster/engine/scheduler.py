"""Continuous batching: which sequences run in the next step, within token, sequence and block limits.

A step is either a prefill batch (new or preempted sequences, prompt tokens not yet in the cache) or
a decode batch (one token for each running sequence). Prefill goes first so new requests join the
running batch quickly. When decode runs out of blocks, the most recently admitted sequence is
preempted: its blocks are freed and it is recomputed later from its tokens (free and recompute).
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass

from cluster.engine.block_manager import BlockManager
from cluster.engine.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    chunked_prefill: bool = False  # mix prompt chunks into decode steps (colocated serving)


@dataclass
class ScheduledBatch:
    """The sequences of one step and how many new tokens each computes; `is_prefill` is False only when
    every sequence decodes exactly one token (the CUDA-graph path)."""

    seqs: list[Sequence]
    num_tokens: list[int]

    @functools.cached_property
    def is_prefill(self) -> bool:  # once per step, before the step advances the sequences
        return any(n != 1 or s.num_computed_tokens != len(s) - 1 for s, n in zip(self.seqs, self.num_tokens,
                                                                                 strict=True))


class Scheduler:
    def __init__(self, limits: SchedulerLimits, block_manager: BlockManager) -> None:
        self.limits = limits
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose KV is already in its blocks (imported from a prefill worker)."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        if self.limits.chunked_prefill:
            return self._schedule_mixed()
        batch = self._schedule_prefill()
        if batch:
            return ScheduledBatch(batch, [s.num_new_tokens for s in batch])
        batch = self._schedule_decode()
        return ScheduledBatch(batch, [1] * len(batch)) if batch else None

    def _schedule_mixed(self) -> ScheduledBatch | None:
        """Running sequences first (one token each for decodes, the next chunk for prompts in progress), then
        new prompts, all within one token budget: a long prompt never stalls the running decodes."""
        seqs: list[Sequence] = []
        chunks: list[int] = []
        budget = self.limits.max_num_batched_tokens
        candidates = deque(self.running)
        self.running.clear()
        while candidates and len(seqs) < self.limits.max_num_seqs and budget > 0:
            seq = candidates.popleft()
            if seq.num_new_tokens == 1 and not self._make_room(seq, candidates):
                continue  # preempted itself
            chunk = min(seq.num_new_tokens, budget)
            budget -= chunk
            seqs.append(seq)
            chunks.append(chunk)
        self.running.extend(seqs)
        self.running.extend(candidates)
        while self.waiting and len(self.running) < self.limits.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                if not self.running and not self._can_ever_fit(seq):
                    raise RuntimeError(f"request {seq.request_id} needs more KV blocks than the cache has")
                break
            self.blocks.allocate(seq)
            self._admit()
            self.running.append(seq)
            chunk = min(seq.num_new_tokens, budget)
            budget -= chunk
            seqs.append(seq)
            chunks.append(chunk)
        return ScheduledBatch(seqs, chunks) if seqs else None

    def _make_room(self, seq: Sequence, others: deque[Sequence]) -> bool:
        """Give a decoding sequence a slot for its next token, preempting the newest others if needed.
        Returns False if `seq` itself had to be preempted."""
        while not self.blocks.can_append(seq):
            if not others:
                self._preempt(seq)
                return False
            self._preempt(others.pop())
        self.blocks.append_slot(seq)
        return True

    def _schedule_prefill(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        budget = self.limits.max_num_batched_tokens
        while self.waiting and len(self.running) + len(scheduled) < self.limits.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                if not scheduled and not self.running and not self._can_ever_fit(seq):
                    raise RuntimeError(f"request {seq.request_id} needs more KV blocks than the cache has")
                break
            self.blocks.allocate(seq)
            # A prompt larger than the whole budget still runs, alone, so it cannot starve.
            if seq.num_new_tokens > budget and scheduled:
                self.blocks.free_sequence(seq)
                break
            budget -= seq.num_new_tokens
            self._admit()
            scheduled.append(seq)
        self.running.extend(scheduled)
        return scheduled

    def _admit(self) -> None:
        """The head of the waiting queue (its blocks allocated) starts running."""
        seq = self.waiting.popleft()
        seq.num_cached_tokens = max(seq.num_cached_tokens, seq.num_computed_tokens)
        seq.status = SeqStatus.RUNNING

    def _can_ever_fit(self, seq: Sequence) -> bool:
        return self.blocks.blocks_needed(len(seq)) <= self.blocks.num_usable_blocks

    def _schedule_decode(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        candidates = deque(self.running)
        self.running.clear()
        while candidates and len(scheduled) < self.limits.max_num_seqs:
            seq = candidates.popleft()
            if self._make_room(seq, candidates):
                scheduled.append(seq)
        self.running.extend(scheduled)
        self.running.extend(candidates)  # over max_num_seqs: wait for the next step
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.blocks.free_sequence(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.blocks.free_sequence(seq)
        seq.status = SeqStatus.FINISHED
