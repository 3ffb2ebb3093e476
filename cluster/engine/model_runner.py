"""Runs one scheduled batch through the model: builds the typed inputs, forwards, samples.

Policy (who runs) stays in the scheduler; this file only turns sequences into tensors and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cluster.engine.attention import AttentionMetadata, forward_context
from cluster.engine.kernels.tiling import decode_splits, prefill_tiles
from cluster.engine.models.llama import LlamaForCausalLM
from cluster.engine.sampler import SamplingTensors, sample, top_logprobs
from cluster.engine.scheduler import ScheduledBatch
from cluster.engine.sequence import Sequence

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
        if use_cuda_graphs and device.type == "cuda":
            from cluster.engine.cuda_graph import DecodeGraphs

            self.graphs = DecodeGraphs(model, kv_cache, max_batch, -(-max_model_len // block_size), device)
            self.graphs.capture()

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, pin_memory=False).to(self.device, non_blocking=True)

    def prepare(self, batch: ScheduledBatch) -> ForwardBatch:
        seqs = batch.seqs
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        for seq in seqs:
            start = seq.num_computed_tokens if batch.is_prefill else len(seq) - 1
            new = seq.token_ids[start:]
            input_ids.extend(new)
            positions.extend(range(start, len(seq)))
            query_lens.append(len(new))
            for pos in range(start, len(seq)):
                slots.append(seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size)
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        ctx_lens = [len(s) for s in seqs]
        ends = torch.tensor(query_lens).cumsum(0)
        attn = AttentionMetadata(
            is_prefill=batch.is_prefill,
            slot_mapping=self._tensor(slots, torch.long),
            block_tables=self._tensor(tables, torch.int32),
            context_lens=self._tensor(ctx_lens, torch.int32),
            query_start_loc=self._tensor([0, *ends.tolist()], torch.int32) if batch.is_prefill else None,
            query_lens=query_lens if batch.is_prefill else None,
            context_lens_host=ctx_lens if batch.is_prefill else None,
        )
        if self.device.type == "cuda":
            if batch.is_prefill:
                tile_seq, tile_start = prefill_tiles(query_lens)
                attn.tile_seq = self._tensor(tile_seq, torch.int32)
                attn.tile_start = self._tensor(tile_start, torch.int32)
            else:
                attn.num_splits = decode_splits(len(seqs), self.model.spec.num_kv_heads,
                                                torch.cuda.get_device_properties(self.device).multi_processor_count)
        return ForwardBatch(
            input_ids=self._tensor(input_ids, torch.long),
            positions=self._tensor(positions, torch.long),
            logits_indices=(ends - 1).to(self.device),
            attn=attn,
            sampling=self._sampling_tensors(seqs),
        )

    def _sampling_tensors(self, seqs: list[Sequence]) -> SamplingTensors:
        temps = [s.params.temperature for s in seqs]
        top_k = [s.params.top_k if s.params.top_k > 0 else self.vocab_size for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        return SamplingTensors(
            temperature=self._tensor(temps, torch.float32),
            top_k=self._tensor(top_k, torch.long),
            top_p=self._tensor(top_p, torch.float32),
            seed=self._tensor([s.seed for s in seqs], torch.long),
            position=self._tensor([s.num_output_tokens for s in seqs], torch.long),
            any_random=any(t > 0 for t in temps),
            needs_filter=any(k < self.vocab_size for k in top_k) or any(p < 1.0 for p in top_p),
        )

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> ModelOutput:
        fb = self.prepare(batch)
        if self.graphs is not None and not batch.is_prefill and len(batch.seqs) <= self.graphs.sizes[-1]:
            a = fb.attn
            logits = self.graphs.run(fb.input_ids, fb.positions, a.slot_mapping, a.context_lens, a.block_tables)
        else:
            with forward_context(fb.attn, self.kv_cache):
                hidden = self.model(fb.input_ids, fb.positions)
            logits = self.model.compute_logits(hidden[fb.logits_indices])
        tokens = sample(logits, fb.sampling)
        want = [s.params.logprobs for s in batch.seqs]
        logprobs: list[dict[int, float] | None] = [None] * len(want)
        if any(w is not None for w in want):
            k = max(w or 0 for w in want)
            chosen, top_vals, top_ids = (x.tolist() for x in top_logprobs(logits, tokens, k))
            for i, w in enumerate(want):
                if w is not None:
                    entry = dict(zip(top_ids[i][:w], top_vals[i][:w], strict=True))
                    entry[int(tokens[i])] = chosen[i]
                    logprobs[i] = entry
        return ModelOutput(token_ids=tokens.tolist(), logprobs=logprobs)
