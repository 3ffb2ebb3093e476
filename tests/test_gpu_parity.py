"""On a GPU: float32 CUDA greedy equals transformers exactly; bfloat16 agrees on the first 32 tokens for
most prompts (the fraction is reported, and written as JSON when PDSERVE_RESULTS_DIR is set).

    python -m pytest -m gpu tests/test_gpu_parity.py -s
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cluster.engine import LLM, SamplingParams
from tests.conftest import ARCHS
from tests.test_engine_parity import ragged_prompts

pytestmark = pytest.mark.gpu
NEW_TOKENS = 32


def hf_greedy_cuda(model_dir: Path, prompts: list[list[int]], dtype: torch.dtype,
                   attn_implementation: str = "sdpa") -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype,
                                                 attn_implementation=attn_implementation).cuda().eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            outs.append(g[0, len(p):].tolist())
    del model
    torch.cuda.empty_cache()
    return outs


def ours(model_dir: Path, prompts: list[list[int]], dtype: str) -> list[list[int]]:
    llm = LLM(str(model_dir), device="cuda", dtype=dtype, num_kv_blocks=2048, max_num_seqs=32,
              max_model_len=4096)
    outs = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0,
                                                                        ignore_eos=True))]
    llm.engine.check_block_accounting()
    del llm
    torch.cuda.empty_cache()
    return outs


def record(name: str, data: dict) -> None:
    out = os.environ.get("PDSERVE_RESULTS_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(data, indent=2))
    print(f"\n{name}: {json.dumps(data)}")


@pytest.mark.parametrize("arch", ARCHS)
def test_float32_cuda_matches_transformers_exactly(model_factory, arch):
    model_dir = model_factory(arch)
    prompts = ragged_prompts(1000, n=16)
    expected = hf_greedy_cuda(model_dir, prompts, torch.float32)
    got = ours(model_dir, prompts, "float32")
    same = sum(a == b for a, b in zip(got, expected, strict=True))
    record(f"gpu_fp32_parity_{arch}", {"prompts": len(prompts), "exact": same, "tokens": NEW_TOKENS,
                                        "device": torch.cuda.get_device_name()})
    assert got == expected


@pytest.mark.parametrize("shape", ["tiny", "llama-3.2-1b"])
def test_bfloat16_mostly_matches_transformers(tmp_path_factory, shape):
    from cluster.engine.make_model import make_model

    model_dir = make_model(tmp_path_factory.mktemp(shape), arch="llama", shape=shape, dtype="bfloat16",
                           device="cuda")
    prompts = ragged_prompts(1000, n=16)
    expected = hf_greedy_cuda(model_dir, prompts, torch.bfloat16)
    # The noise floor: transformers against itself with another attention kernel, same weights, same dtype.
    hf_eager = hf_greedy_cuda(model_dir, prompts, torch.bfloat16, attn_implementation="eager")
    got = ours(model_dir, prompts, "bfloat16")

    def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, list[int]]:
        firsts = [next((i for i, (x, y) in enumerate(zip(u, v, strict=True)) if x != y), NEW_TOKENS)
                  for u, v in zip(a, b, strict=True)]
        return sum(f == NEW_TOKENS for f in firsts), firsts

    exact, first_diff = agreement(got, expected)
    floor, floor_diff = agreement(hf_eager, expected)
    record(f"gpu_bf16_parity_{shape}", {
        "prompts": len(prompts), "tokens": NEW_TOKENS, "ours_vs_hf_sdpa_exact": exact,
        "fraction": exact / len(prompts), "first_divergence": first_diff,
        "hf_eager_vs_hf_sdpa_exact": floor, "hf_eager_first_divergence": floor_diff,
        "device": torch.cuda.get_device_name()})
    # Random weights have near-tied logits, so bf16 rounding alone flips some argmaxes: we must agree with
    # transformers about as often as transformers agrees with itself under another attention kernel.
    assert exact >= min(floor, len(prompts) // 2) - 2
