"""Greedy outputs equal transformers' own generate on the same weights, token for token (float32, CPU)."""

from __future__ import annotations

import random

import pytest
import torch

from cluster.engine import LLM, SamplingParams
from tests.conftest import ARCHS

NEW_TOKENS = 64


def ragged_prompts(vocab: int, n: int = 16, seed: int = 0) -> list[list[int]]:
    """Prompts of 3..90 tokens; half share one of two prefixes of 2-3 blocks (prefix-cache hits)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, vocab) for _ in range(40)], [rng.randrange(3, vocab) for _ in range(35)]]
    prompts = []
    for i in range(n):
        suffix = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 50))]
        prompts.append((prefixes[i % 2] + suffix) if i % 4 < 2 else suffix + suffix[: i % 7])
    return prompts


def hf_greedy(model_dir, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            outs.append(g[0, len(p):].tolist())
    return outs


@pytest.fixture(scope="module", params=ARCHS)
def arch_case(request, model_factory):
    model_dir = model_factory(request.param)
    llm = LLM(str(model_dir), num_kv_blocks=512)
    prompts = ragged_prompts(llm.tokenizer.vocab_size)
    return model_dir, prompts, hf_greedy(model_dir, prompts, NEW_TOKENS)


GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_matches_transformers(arch_case, prefix_caching):
    model_dir, prompts, expected = arch_case
    llm = LLM(str(model_dir), num_kv_blocks=512, enable_prefix_caching=prefix_caching)
    # Run twice: the second pass hits the prefix cache for every prompt.
    for _ in range(2):
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == expected
    if prefix_caching:
        assert any(o.num_cached_tokens > 0 for o in outs)
    else:
        assert all(o.num_cached_tokens == 0 for o in outs)
    llm.engine.check_block_accounting()
    assert llm.engine.stats().num_free_blocks == 512


def test_greedy_matches_under_preemption(arch_case):
    model_dir, prompts, expected = arch_case
    llm = LLM(str(model_dir), num_kv_blocks=24, max_num_batched_tokens=512)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert llm.engine.stats().num_preemptions > 0
    llm.engine.check_block_accounting()
    assert llm.engine.stats().num_free_blocks == 24


def test_text_prompts_and_finish_reasons(tiny_llama):
    llm = LLM(str(tiny_llama), num_kv_blocks=64)
    out = llm.generate("Hello there, how are", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert out.text == llm.tokenizer.decode(out.token_ids)
    stop_id = out.token_ids[2]
    out2 = llm.generate("Hello there, how are",
                        SamplingParams(max_tokens=5, temperature=0, stop_token_ids=(stop_id,)))[0]
    assert out2.finish_reason == "stop" and out2.token_ids == out.token_ids[: out.token_ids.index(stop_id) + 1]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_matches_with_chunked_prefill(arch_case, prefix_caching):
    """Prompt chunks of at most 24 tokens mixed into decode steps (colocated serving), small block pool."""
    model_dir, prompts, expected = arch_case
    llm = LLM(str(model_dir), num_kv_blocks=40, enable_chunked_prefill=True, max_num_batched_tokens=24,
              enable_prefix_caching=prefix_caching)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    llm.engine.check_block_accounting()
    assert llm.engine.stats().num_free_blocks == 40
