"""The stepping engine: requests in, one scheduled forward per `step()`, token deltas out.

Besides plain generation it offers the split that disaggregation needs:
- prefill role: `add_request(..., prefill_only=True)` computes the prompt's KV and first token and keeps
  the blocks (`prefilled_blocks`) until `release_prefilled` after the KV has been sent;
- decode role: `reserve` blocks for KV that will arrive, then `add_prefilled_request` to decode from it.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from cluster.config import EngineConfig
from cluster.engine.block_manager import BlockManager
from cluster.engine.kv_layout import KVLayout
from cluster.engine.model_runner import ModelRunner
from cluster.engine.models.loader import build_model, read_model_spec
from cluster.engine.output_processor import OutputProcessor
from cluster.engine.outputs import FINISH_ABORT, FINISH_PREFILLED, StepOutput
from cluster.engine.scheduler import ScheduledBatch, Scheduler, SchedulerLimits
from cluster.engine.sequence import Sequence
from cluster.sampling_params import SamplingParams
from cluster.tokenizer import TextTokenizer


class LayerSink(Protocol):
    """Receives a prefill's KV layer by layer (a KV transport's send stream)."""

    def layers_ready(self, src_block_ids: list[int], upto: int) -> None: ...


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_total_blocks: int
    num_reserved_blocks: int
    num_prefilled_held: int
    num_preemptions: int
    num_prefix_cached_blocks: int


class LLMEngine:
    """One model on one device with its paged KV cache and scheduler."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda":  # Triton launches on the thread's current device: make it ours
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        self.dtype = getattr(torch, config.torch_dtype_name)
        self.spec = read_model_spec(config.model)
        self.max_model_len = min(config.max_model_len or self.spec.max_position_embeddings,
                                 self.spec.max_position_embeddings)
        self.tokenizer = TextTokenizer(config.model)
        self.model = build_model(self.spec, config.model, self.max_model_len, self.dtype, self.device)
        self.kv_layout = KVLayout(self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim,
                                  config.block_size, self.dtype)
        self.kv_cache = self.kv_layout.allocate(self._num_blocks(), self.device)
        self.block_manager = BlockManager(self.kv_cache.shape[2], config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerLimits(config.max_num_seqs, config.max_num_batched_tokens,
                                                   config.enable_chunked_prefill), self.block_manager)
        self.runner = ModelRunner(self.model, self.kv_cache, config.block_size, self.device,
                                  use_cuda_graphs=not config.enforce_eager, max_batch=config.max_num_seqs,
                                  max_model_len=self.max_model_len)
        eos = self.spec.eos_token_ids or ((self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id
                                          is not None else ())
        self.outputs = OutputProcessor(self.tokenizer, eos, self.max_model_len)
        self._seqs: dict[str, Sequence] = {}
        self._prefilled: dict[str, Sequence] = {}
        self._reservations: dict[str, list[int]] = {}
        self._kv_sinks: dict[str, LayerSink] = {}
        self._seed_rng = random.Random(config.seed)
        # Block accounting may be touched from another thread through reserve()/release_reservation() (a
        # decode worker reserves without waiting out a step): step() holds this while it schedules and while
        # it books the results, never during the forward. Reentrant: an engine-thread caller may hold it too.
        self.state_lock = threading.RLock()
        self.last_step_tokens = 0  # tokens the last step() computed; 0: it could schedule nothing

    def _num_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks + 1  # + the scratch block
        if self.device.type == "cuda":  # this engine's share of the device, less the weights it loaded
            torch.cuda.empty_cache()  # the loader's freed temporaries are not this engine's to keep
            free, total = torch.cuda.mem_get_info(self.device)
            budget = self.config.kv_cache_budget(total, free, torch.cuda.memory_reserved(self.device))
        else:
            budget = self.config.kv_cache_memory_gb * 2**30
        n = int(budget // self.kv_layout.bytes_per_block)
        if n < 2:
            raise ValueError("not enough memory for even one KV block; lower the model size or raise the budget")
        return n

    # ---- requests ----------------------------------------------------------------------------------
    def _new_sequence(self, request_id: str, token_ids: list[int], num_prompt: int, params: SamplingParams,
                      prefill_only: bool) -> Sequence:
        if request_id in self._seqs or request_id in self._prefilled or request_id in self._reservations:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not token_ids:
            raise ValueError("prompt must contain at least one token")
        if num_prompt + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"the model's maximum length {self.max_model_len}")
        bad = [t for t in token_ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise ValueError(f"token ids out of vocabulary range [0, {self.spec.vocab_size}): {bad[:5]}")
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        seq = Sequence(request_id, list(token_ids), num_prompt, params, seed, prefill_only=prefill_only)
        self.outputs.attach(seq)
        self._seqs[request_id] = seq
        return seq

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    *, prefill_only: bool = False) -> None:
        """Queue a prompt. With `prefill_only`, the request ends after its first token (see module doc)."""
        seq = self._new_sequence(request_id, prompt_token_ids, len(prompt_token_ids), params, prefill_only)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks. Returns False if the id is unknown."""
        found = self.release_prefilled(request_id) | self.release_reservation(request_id)
        self._kv_sinks.pop(request_id, None)
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self.scheduler.remove(seq)
            seq.finish_reason = FINISH_ABORT
            found = True
        return found

    # ---- prefill role ------------------------------------------------------------------------------
    def stream_kv(self, request_id: str, sink: LayerSink) -> None:
        """Hand a prefill-only request's KV to `sink` layer by layer during the forward that completes its
        prompt (`sink.layers_ready(blocks, i + 1)` right after layer i); the caller ends the sink's transfer."""
        seq = self._seqs.get(request_id)
        if seq is None or not seq.prefill_only:
            raise ValueError(f"no prefill-only request {request_id!r} to stream KV from")
        self._kv_sinks[request_id] = sink

    def prefilled_blocks(self, request_id: str) -> tuple[list[int], int]:
        """Block ids and token count of a finished prefill-only request's KV."""
        seq = self._prefilled[request_id]
        return list(seq.block_table), seq.num_computed_tokens

    def release_prefilled(self, request_id: str) -> bool:
        seq = self._prefilled.pop(request_id, None)
        if seq is None:
            return False
        self.block_manager.free_sequence(seq)
        return True

    # ---- decode role -------------------------------------------------------------------------------
    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Blocks for `num_tokens` tokens of KV that will be written from outside; None if they don't fit.
        Thread-safe (`state_lock`): callable between or during steps from any thread."""
        with self.state_lock:
            if request_id in self._reservations or request_id in self._seqs:
                raise ValueError(f"request id {request_id!r} is already in use")
            if self.block_manager.blocks_needed(num_tokens) > self.block_manager.num_free_blocks:
                return None
            blocks = self.block_manager.allocate_blocks(num_tokens)
            self._reservations[request_id] = blocks
            return blocks

    def release_reservation(self, request_id: str) -> bool:
        """Give a reservation's blocks back (thread-safe, like `reserve`)."""
        with self.state_lock:
            blocks = self._reservations.pop(request_id, None)
            if blocks is None:
                return False
            self.block_manager.release_blocks(blocks)
            return True

    def add_prefilled_request(self, request_id: str, prompt_token_ids: list[int], first_token_id: int,
                              params: SamplingParams, seed: int | None = None) -> None:
        """Start decoding a request whose prompt KV already sits in its reserved blocks."""
        blocks = self._reservations.pop(request_id, None)
        if blocks is None:
            raise ValueError(f"no reservation for request {request_id!r}")
        needed = self.block_manager.blocks_needed(len(prompt_token_ids))
        if needed != len(blocks):
            self.block_manager.release_blocks(blocks)
            raise ValueError(f"reservation has {len(blocks)} blocks, the prompt needs {needed}")
        if seed is not None:
            params = SamplingParams(**{**params.__dict__, "seed": seed})
        try:
            seq = self._new_sequence(request_id, [*prompt_token_ids, first_token_id], len(prompt_token_ids),
                                     params, prefill_only=False)
        except ValueError:
            self.block_manager.release_blocks(blocks)
            raise
        seq.block_table = blocks
        seq.num_computed_tokens = len(prompt_token_ids)
        self.block_manager.commit(seq)
        self.outputs.seed_first_token(seq)
        self.scheduler.add_running(seq)

    # ---- stepping ----------------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[StepOutput]:
        """Run one forward over the scheduled batch; return what each request produced (nothing for a step
        of prompt chunks only: check `last_step_tokens` to tell it from a step that could schedule nothing)."""
        with self.state_lock:
            batch = self.scheduler.schedule()
        self.last_step_tokens = sum(batch.num_tokens) if batch is not None else 0
        if batch is None:
            return []
        result = self.runner.run(batch, self._layer_hook(batch))
        outs: list[StepOutput] = []
        with self.state_lock:
            for seq, n, token, logprobs in zip(batch.seqs, batch.num_tokens, result.token_ids, result.logprobs,
                                               strict=True):
                seq.num_computed_tokens += n
                self.block_manager.commit(seq)
                if seq.num_computed_tokens < len(seq):  # a prompt chunk: its sampled token means nothing yet
                    continue
                out = self.outputs.append_token(seq, token, logprobs)
                if out.finished:
                    self._finish(seq, out)
                outs.append(out)
        return outs

    def _layer_hook(self, batch: ScheduledBatch) -> Callable[[int], None] | None:
        """For the requests whose prompt this batch completes and whose KV streams out: the per-layer call."""
        if not self._kv_sinks or not batch.is_prefill:
            return None
        sinks = [(seq.block_table, self._kv_sinks[seq.request_id]) for seq, n in zip(batch.seqs, batch.num_tokens,
                 strict=True) if seq.request_id in self._kv_sinks and seq.num_computed_tokens + n >= len(seq)]
        if not sinks:
            return None

        def on_layer(layer: int) -> None:
            for blocks, sink in sinks:
                sink.layers_ready(blocks, layer + 1)

        return on_layer

    def _finish(self, seq: Sequence, out: StepOutput) -> None:
        self._kv_sinks.pop(seq.request_id, None)
        self._seqs.pop(seq.request_id, None)
        if seq.prefill_only and seq.finish_reason is not None and seq.finish_reason != FINISH_ABORT:
            if seq.finish_reason == FINISH_PREFILLED:  # the caller needs them at once, not a step later
                out.kv_block_ids = list(seq.block_table)
            self.scheduler.running.remove(seq)
            self._prefilled[seq.request_id] = seq  # blocks stay until release_prefilled
        else:
            self.scheduler.remove(seq)

    def stats(self) -> EngineStats:
        with self.state_lock:  # a reservation from another thread must not change what we count mid-count
            return EngineStats(
                num_waiting=len(self.scheduler.waiting),
                num_running=len(self.scheduler.running),
                num_free_blocks=self.block_manager.num_free_blocks,
                num_total_blocks=self.block_manager.num_usable_blocks,
                num_reserved_blocks=sum(len(b) for b in self._reservations.values()),
                num_prefilled_held=len(self._prefilled),
                num_preemptions=self.scheduler.num_preemptions,
                num_prefix_cached_blocks=len(self.block_manager.hash_to_block),
            )

    def check_block_accounting(self) -> None:
        """Raise unless every block is free or owned by a live request, reservation or held prefill."""
        with self.state_lock:
            tables = [s.block_table for s in self._seqs.values()]
            tables += [s.block_table for s in self._prefilled.values()]
            tables += list(self._reservations.values())
            self.block_manager.check_invariants(tables)
