"""Decode captured in CUDA graphs at padded batch sizes (one graph per size, one shared memory pool).

A decode step's shapes depend only on the batch size: inputs, slot mapping, sequence lengths and block
tables live in static device buffers that `run` fills before replaying the graph of the next size up.
Padding rows decode a dummy token whose KV goes to the scratch block 0.
"""

from __future__ import annotations

import torch

from cluster.engine.attention import AttentionMetadata, forward_context
from cluster.engine.kernels.tiling import decode_splits
from cluster.engine.models.llama import LlamaForCausalLM


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, max_batch: int, max_blocks_per_seq: int,
                 device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = graph_batch_sizes(max_batch)
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        i32, i64 = torch.int32, torch.long
        self.input_ids = torch.zeros(max_batch, dtype=i64, device=device)
        self.positions = torch.zeros(max_batch, dtype=i64, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=i64, device=device)
        self.context_lens = torch.ones(max_batch, dtype=i32, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=i32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(is_prefill=False, slot_mapping=self.slot_mapping[:bs],
                                 block_tables=self.block_tables[:bs], context_lens=self.context_lens[:bs],
                                 num_splits=decode_splits(bs, self.model.spec.num_kv_heads, self.num_sms))

    def _forward(self, bs: int) -> torch.Tensor:
        with forward_context(self._metadata(bs), self.kv_cache):
            hidden = self.model(self.input_ids[:bs], self.positions[:bs])
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            self._forward(bs)  # warm up: compile kernels, pick cuBLAS algorithms
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            context_lens: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """Replay the graph for len(input_ids) rows (padded up); returns logits [B, V] (a view, valid until
        the next replay)."""
        bs = input_ids.shape[0]
        padded = next(s for s in self.sizes if s >= bs)
        self.input_ids[:bs].copy_(input_ids)
        self.positions[:bs].copy_(positions)
        self.slot_mapping[:bs].copy_(slot_mapping)
        self.context_lens[:bs].copy_(context_lens)
        self.block_tables[:bs, : block_tables.shape[1]].copy_(block_tables)
        if padded > bs:
            self.slot_mapping[bs:padded].fill_(-1)
            self.context_lens[bs:padded].fill_(1)
            self.block_tables[bs:padded, 0].fill_(0)
        self.graphs[padded].replay()
        return self.logits[padded][:bs]
