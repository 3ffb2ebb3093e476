"""Runs one scheduled batch through the model: builds the typed inputs, forwards, samples.

Policy (who runs) stays in the scheduler; this file only turns sequences into tensors and back.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from cluster.engine.attention import AttentionMetadata, forward_context
from cluster.engine.kernels.tiling import decode_splits, prefill_tiles
from cluster.engine.models.llama import LlamaForCausalLM
from cluster.engine.sampler import SamplingTensors, sample, top_logprobs
from cluster.engine.scheduler import ScheduledBatch

if TYPE_CHECKING:
    from cluster.engine.cuda_graph import DecodeGraphs


@dataclass
class ForwardBatch:
    """Flat model inputs for one step (T tokens over B sequences)."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    logits_indices: torch.Tensor  # [B]: the token whose logits pick each sequence's next token
    attn: AttentionMetadata
    sampling: SamplingTensors


@dataclass
class ModelOutput:
    """Per sequence: the sampled token and, when asked, logprobs (host lists)."""

    token_ids: list[int]
    logprobs: list[dict[int, float] | None]


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, block_size: int,
                 device: torch.device, *, use_cuda_graphs: bool = False, max_batch: int = 1,
                 max_model_len: int = 0) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device
        self.vocab_size = model.spec.vocab_size
        self.graphs: DecodeGraphs | None = None
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
        if use_cuda_graphs and device.type == "cuda":
            from cluster.engine.cuda_graph import DecodeGraphs

            self.graphs = DecodeGraphs(model, kv_cache, max_batch, -(-max_model_len // block_size), device)
            self.graphs.capture()

    def _upload(self, parts: list[list[int]]) -> list[torch.Tensor]:
        """Several int lists to the device in ONE host-to-device copy; returns int64 device views.
        Through numpy: a decode step's ~3K ints (mostly block tables) take ~40 us, `torch.tensor` of the
        list ~160 us, with the GPU idle until the step's inputs are in."""
        flat = np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int64, count=sum(map(len, parts)))
        host = torch.from_numpy(flat)
        if self.device.type == "cuda":
            host = host.pin_memory()
        return list(host.to(self.device, non_blocking=True).split([len(p) for p in parts]))

    def prepare(self, batch: ScheduledBatch) -> ForwardBatch:
        seqs, bs = batch.seqs, self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        is_prefill = batch.is_prefill
        ctx_lens: list[int] = []
        for seq, n in zip(seqs, batch.num_tokens, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            query_lens.append(n)
            ctx_lens.append(end)
            table = seq.block_table
            slots.extend(table[pos // bs] * bs + pos % bs for pos in range(start, end))
        width = max(len(s.block_table) for s in seqs)
        tables = list(itertools.chain.from_iterable(s.block_table + [0] * (width - len(s.block_table)) for s in seqs))
        query_start = list(itertools.accumulate(query_lens, initial=0))
        tile_seq, tile_start = prefill_tiles(query_lens) if is_prefill else ([], [])
        random = any(s.params.temperature > 0 for s in seqs)
        top_k = [s.params.top_k if s.params.top_k > 0 else self.vocab_size for s in seqs] if random else []
        sampling_ints = [top_k, [s.seed for s in seqs], [s.num_output_tokens for s in seqs]] if random else [[], [], []]
        (ids_t, pos_t, slot_t, table_t, ctx_t, qsl_t, logit_idx_t, tseq_t, tstart_t, topk_t, seed_t,
         opos_t) = self._upload([input_ids, positions, slots, tables, ctx_lens, query_start, query_start[1:],
                                 tile_seq, tile_start, *sampling_ints])
        attn = AttentionMetadata(
            is_prefill=is_prefill, slot_mapping=slot_t, block_tables=table_t.view(len(seqs), width),
            context_lens=ctx_t, query_start_loc=qsl_t if is_prefill else None,
            query_lens=query_lens if is_prefill else None, context_lens_host=ctx_lens if is_prefill else None,
            tile_seq=tseq_t if is_prefill else None, tile_start=tstart_t if is_prefill else None)
        if self.device.type == "cuda" and not is_prefill:
            attn.num_splits = decode_splits(len(seqs), self.model.spec.num_kv_heads, self.num_sms)
        sampling = SamplingTensors(temperature=None, top_k=topk_t, top_p=None, seed=seed_t, position=opos_t,
                                   any_random=random, needs_filter=False)
        if random:
            floats = torch.tensor([[s.params.temperature for s in seqs], [s.params.top_p for s in seqs]],
                                  dtype=torch.float32).to(self.device, non_blocking=True)
            sampling.temperature, sampling.top_p = floats[0], floats[1]
            sampling.needs_filter = any(k < self.vocab_size for k in top_k) or any(s.params.top_p < 1.0 for s in seqs)
        return ForwardBatch(input_ids=ids_t, positions=pos_t, logits_indices=logit_idx_t - 1, attn=attn,
                            sampling=sampling)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, on_layer_kv: Callable[[int], None] | None = None) -> ModelOutput:
        """Forward and sample one batch; `on_layer_kv(i)` (prefill only) runs once layer i's KV is enqueued."""
        fb = self.prepare(batch)
        if self.graphs is not None and not batch.is_prefill and len(batch.seqs) <= self.graphs.sizes[-1]:
            a = fb.attn
            logits = self.graphs.run(fb.input_ids, fb.positions, a.slot_mapping, a.context_lens, a.block_tables)
        else:
            with forward_context(fb.attn, self.kv_cache, on_layer_kv):
                hidden = self.model(fb.input_ids, fb.positions)
            logits = self.model.compute_logits(hidden[fb.logits_indices])
        tokens = sample(logits, fb.sampling)
        want = [s.params.logprobs for s in batch.seqs]
        top = top_logprobs(logits, tokens, max(w or 0 for w in want)) if any(w is not None for w in want) else None
        if tokens.is_cuda:
            # Wait for the step here (GIL released) before reading results. A pageable copy (tolist) from a busy
            # stream holds a CUDA driver lock until the stream drains, so every other thread's copy or memset (a
            # KV receive's NCCL post, a cuda_ipc 2D copy) would wait out the whole step for it.
            torch.cuda.current_stream(tokens.device).synchronize()
        token_ids = tokens.tolist()
        logprobs: list[dict[int, float] | None] = [None] * len(want)
        if top is not None:
            chosen, top_vals, top_ids = (x.tolist() for x in top)
            for i, w in enumerate(want):
                if w is not None:
                    entry = dict(zip(top_ids[i][:w], top_vals[i][:w], strict=True))
                    entry[token_ids[i]] = chosen[i]
                    logprobs[i] = entry
        return ModelOutput(token_ids=token_ids, logprobs=logprobs)
