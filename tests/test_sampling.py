"""Sampling: validation, seeds independent of the batch, top-k/top-p, stop strings, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from cluster.engine import LLM, SamplingParams
from cluster.engine.sampler import SamplingTensors, sample, uniform_noise


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), num_kv_blocks=256)


@pytest.mark.parametrize("kwargs, reason", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"logprobs": 50}, "logprobs"),
    ({"stop": ("",)}, "stop"),
    ({"stop_token_ids": (-3,)}, "stop_token_ids"),
])
def test_invalid_params_raise_with_reason(kwargs, reason):
    with pytest.raises(ValueError, match=reason):
        SamplingParams(**kwargs)


def test_seeded_sampling_is_independent_of_batch(llm):
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate("A seeded prompt about rivers", params)[0].token_ids
    others = [SamplingParams(max_tokens=n, temperature=t, seed=s, ignore_eos=True)
              for n, t, s in [(5, 1.0, 1), (30, 0.0, None), (17, 1.3, 99)]]
    prompts = ["noise one", "A seeded prompt about rivers", "another noisy prompt with more words", "x"]
    mixed = llm.generate(prompts, [others[0], params, others[1], others[2]])
    assert mixed[1].token_ids == alone
    assert llm.generate("A seeded prompt about rivers", params)[0].token_ids == alone
    different = llm.generate("A seeded prompt about rivers",
                             SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=4321,
                                            ignore_eos=True))[0].token_ids
    assert different != alone


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate("Top k of one", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    top1 = llm.generate("Top k of one", SamplingParams(max_tokens=16, temperature=1.5, top_k=1, seed=7,
                                                        ignore_eos=True))[0]
    assert top1.token_ids == greedy.token_ids


def test_sampler_distribution_matches_probabilities():
    """Exponential-race sampling draws tokens with the softmax probabilities (chi-square-free check)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    t = SamplingTensors(temperature=torch.ones(4000), top_k=torch.full((4000,), 4), top_p=torch.ones(4000),
                        seed=torch.arange(4000), position=torch.zeros(4000, dtype=torch.long),
                        any_random=True, needs_filter=False)
    counts = torch.bincount(sample(logits, t), minlength=4).float() / 4000
    assert torch.allclose(counts, logits[0].softmax(-1), atol=0.03)
    u = uniform_noise(torch.tensor([5]), torch.tensor([3]), 1000)
    assert u.min() > 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.05


def test_top_p_restricts_to_nucleus():
    logits = torch.tensor([[5.0, 4.0, -5.0, -6.0]]).repeat(500, 1)
    t = SamplingTensors(temperature=torch.ones(500), top_k=torch.full((500,), 4), top_p=torch.full((500,), 0.5),
                        seed=torch.arange(500), position=torch.zeros(500, dtype=torch.long),
                        any_random=True, needs_filter=True)
    assert set(sample(logits, t).tolist()) == {0}


def test_stop_strings_truncate_text(llm):
    base = llm.generate("Stop strings are", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert len(base.text) > 6
    stop = base.text[3:6]
    out = llm.generate("Stop strings are", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                          stop=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.text == base.text[: base.text.index(stop)]
    assert stop not in out.text


def test_logprobs(llm):
    out = llm.generate("Log probs", SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True))[0]
    assert len(out.logprobs) == 4
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert token in entry and len(entry) == 3  # greedy token is the top-1
        assert entry[token] == max(entry.values()) and entry[token] <= 0
        assert sum(math.exp(v) for v in entry.values()) <= 1 + 1e-5


def test_eos_ends_request(llm):
    eos = llm.engine.outputs.eos_token_ids
    assert eos
    out = llm.generate("eos test", SamplingParams(max_tokens=8, temperature=0, stop_token_ids=tuple(eos)))[0]
    assert out.finish_reason in ("stop", "length")


def test_bad_prompts_raise(llm):
    with pytest.raises(ValueError, match="at least one token"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[10**9]], SamplingParams())
    with pytest.raises(ValueError, match="maximum length"):
        llm.generate([[5] * 10], SamplingParams(max_tokens=10**6))
    llm.engine.check_block_accounting()
