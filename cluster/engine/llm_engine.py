"""The stepping engine: requests in, one scheduled forward per `step()`, token deltas out.

Besides plain generation it offers the split that disaggregation needs (the blocks in between are kept by
its `KVHandoff`, `kv_handoff.py`):
- prefill role: `add_request(..., prefill_only=True)` computes the prompt's KV and first token and keeps
  the blocks (`prefilled_blocks`) until `release_prefilled` after the KV has been sent;
- decode role: `reserve` blocks for KV that will arrive, then `add_prefilled_request` to decode from it.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from cluster.config import EngineConfig
from cluster.engine.block_manager import BlockManager, Growth
from cluster.engine.kv_handoff import KVHandoff, LayerSink
from cluster.engine.kv_layout import KVLayout
from cluster.engine.model_runner import ModelRunner
from cluster.engine.models.loader import build_model, read_model_spec
from cluster.engine.output_processor import OutputProcessor
from cluster.engine.outputs import FINISH_ABORT, StepOutput
from cluster.engine.scheduler import Scheduler, SchedulerLimits
from cluster.engine.sequence import Sequence
from cluster.sampling_params import SamplingParams
from cluster.tokenizer import TextTokenizer


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
        # Without a prefix cache there is no eviction order to keep, so growing sequences take the lowest free
        # ids: the long free runs stay whole, and a decode worker's next reservation (the next KV handoff's
        # destination) is few runs of consecutive ids, which cuda_ipc moves as one copy-engine copy each.
        growth: Growth = "lru" if config.enable_prefix_caching else "lowest_id"
        self.block_manager = BlockManager(self.kv_cache.shape[2], config.block_size,
                                          config.enable_prefix_caching, growth)
        self.scheduler = Scheduler(SchedulerLimits(config.max_num_seqs, config.max_num_batched_tokens,
                                                   config.enable_chunked_prefill), self.block_manager)
        self.runner = ModelRunner(self.model, self.kv_cache, config.block_size, self.device,
                                  use_cuda_graphs=not config.enforce_eager, max_batch=config.max_num_seqs,
                                  max_model_len=self.max_model_len)
        eos = self.spec.eos_token_ids or ((self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id
                                          is not None else ())
        self.outputs = OutputProcessor(self.tokenizer, eos, self.max_model_len)
        self._seqs: dict[str, Sequence] = {}
        self.handoff = KVHandoff(self.block_manager)
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
    def _new_sequence(self, request_id: str, token_ids: list[int], num_output_tokens: int, params: SamplingParams,
                      prefill_only: bool) -> Sequence:
        """A sequence of `token_ids` whose last `num_output_tokens` were generated already (see `add_request`)."""
        if request_id in self._seqs or self.handoff.holds(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        if not token_ids:
            raise ValueError("prompt must contain at least one token")
        if not 0 <= num_output_tokens < min(len(token_ids), params.max_tokens):
            raise ValueError(f"num_output_tokens ({num_output_tokens}) must be >= 0 and below both the token count "
                             f"({len(token_ids)}) and max_tokens ({params.max_tokens})")
        num_prompt = len(token_ids) - num_output_tokens
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
                    *, prefill_only: bool = False, num_output_tokens: int = 0) -> None:
        """Queue a prompt. With `prefill_only`, the request ends after its first token (see module doc).
        `num_output_tokens` > 0 continues a request that another worker started: the last that many of
        `prompt_token_ids` are its output so far (already sent, with their text), counted towards max_tokens,
        sampled positions and stop strings as if this engine had made them."""
        seq = self._new_sequence(request_id, prompt_token_ids, num_output_tokens, params, prefill_only)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks. Returns False if the id is unknown."""
        with self.state_lock:
            found = self.handoff.abort(request_id)
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
        self.handoff.stream(request_id, sink)

    def prefilled_blocks(self, request_id: str) -> tuple[list[int], int]:
        """Block ids and token count of a finished prefill-only request's KV."""
        return self.handoff.prefilled_blocks(request_id)

    def release_prefilled(self, request_id: str) -> bool:
        """Free a finished prefill-only request's blocks (its KV has been sent); False if none are held."""
        return self.handoff.release_prefilled(request_id)

    # ---- decode role -------------------------------------------------------------------------------
    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Blocks for `num_tokens` tokens of KV that will be written from outside; None if they don't fit.
        Thread-safe (`state_lock`): callable between or during steps from any thread."""
        with self.state_lock:
            if request_id in self._seqs:
                raise ValueError(f"request id {request_id!r} is already in use")
            return self.handoff.reserve(request_id, num_tokens)

    def release_reservation(self, request_id: str) -> bool:
        """Give a reservation's blocks back (thread-safe, like `reserve`)."""
        with self.state_lock:
            return self.handoff.release_reservation(request_id)

    @property
    def _reservations(self) -> Mapping[str, list[int]]:
        """Open reservations' blocks, read-only (tests look at them)."""
        return self.handoff.reservations

    def add_prefilled_request(self, request_id: str, prompt_token_ids: list[int], first_token_id: int,
                              params: SamplingParams, seed: int | None = None, *, num_output_tokens: int = 0) -> None:
        """Start decoding a request whose prompt KV already sits in its reserved blocks; `num_output_tokens` as
        in `add_request` (those tokens' KV came with the prompt's)."""
        with self.handoff.claim(request_id, len(prompt_token_ids)) as blocks:
            if seed is not None:
                params = SamplingParams(**{**params.__dict__, "seed": seed})
            seq = self._new_sequence(request_id, list(prompt_token_ids), num_output_tokens, params,
                                     prefill_only=False)
        seq.block_table = blocks
        seq.num_computed_tokens = len(prompt_token_ids)
        self.outputs.seed_first_token(seq, first_token_id)
        self.block_manager.commit(seq)
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
        result = self.runner.run(batch, self.handoff.layer_hook(batch))
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

    def _finish(self, seq: Sequence, out: StepOutput) -> None:
        self._seqs.pop(seq.request_id, None)
        if self.handoff.on_finish(seq, out):
            self.scheduler.running.remove(seq)
        else:
            self.scheduler.remove(seq)

    def stats(self) -> EngineStats:
        with self.state_lock:  # a reservation from another thread must not change what we count mid-count
            return EngineStats(
                num_waiting=len(self.scheduler.waiting),
                num_running=len(self.scheduler.running),
                num_free_blocks=self.block_manager.num_free_blocks,
                num_total_blocks=self.block_manager.num_usable_blocks,
                num_reserved_blocks=self.handoff.num_reserved_blocks,
                num_prefilled_held=self.handoff.num_prefilled,
                num_preemptions=self.scheduler.num_preemptions,
                num_prefix_cached_blocks=len(self.block_manager.hash_to_block),
            )

    def check_block_accounting(self) -> None:
        """Raise unless every block is free or owned by a live request, reservation or held prefill."""
        with self.state_lock:
            tables = [s.block_table for s in self._seqs.values()] + self.handoff.block_tables()
            self.block_manager.check_invariants(tables)
