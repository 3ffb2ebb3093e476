"""The offline API: `LLM(model_dir).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq

import torch
from tqdm import tqdm

from cluster.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.outputs import RequestOutput
from cluster.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Generate from a local Hugging Face model directory on CPU or CUDA.

    Keyword arguments are `EngineConfig` fields (block_size, num_kv_blocks, max_num_seqs, ...).
    """

    def __init__(self, model: str, device: str = "cpu", dtype: str | torch.dtype = "auto",
                 **engine_kwargs: object) -> None:
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")  # torch.bfloat16 -> "bfloat16"
        self.engine = LLMEngine(EngineConfig(model=model, device=device, dtype=dtype, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 *, use_tqdm: bool = False) -> list[RequestOutput]:
        """One output per prompt, in order. Prompts are strings or lists of token ids."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if params is None:
            params = SamplingParams()
        param_list = list(params) if not isinstance(params, SamplingParams) else [params] * len(prompts)
        if len(param_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(param_list)} sampling params")
        engine = self.engine
        order: list[str] = []
        prompt_ids: dict[str, list[int]] = {}
        for prompt, p in zip(prompts, param_list, strict=True):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = f"offline-{next(self._ids)}"
            engine.add_request(rid, ids, p)
            order.append(rid)
            prompt_ids[rid] = ids
        tokens: dict[str, list[int]] = {rid: [] for rid in order}
        texts: dict[str, str] = {rid: "" for rid in order}
        done: dict[str, RequestOutput] = {}
        logprobs: dict[str, list] = {rid: [] for rid in order}
        with tqdm(total=len(order), disable=not use_tqdm, desc="generate") as bar:
            try:
                while len(done) < len(order):
                    for out in engine.step():
                        rid = out.request_id
                        tokens[rid].extend(out.new_token_ids)
                        texts[rid] += out.text_delta
                        logprobs[rid].extend(out.logprobs or [])
                        if out.finished:
                            done[rid] = RequestOutput(rid, prompt_ids[rid], tokens[rid], texts[rid],
                                                      out.finish_reason, out.num_cached_tokens, logprobs[rid])
                            bar.update(1)
            finally:
                for rid in order:
                    if rid not in done:
                        engine.abort(rid)
        return [done[rid] for rid in order]
