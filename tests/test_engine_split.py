"""Prefill on one engine, move the KV blocks, decode on another: same tokens as one plain generate."""

from __future__ import annotations

import pytest

from cluster.config import EngineConfig
from cluster.engine import LLM, LLMEngine, SamplingParams
from tests.test_engine_parity import ragged_prompts


def run_split(prefill: LLMEngine, decode: LLMEngine, prompts: list[list[int]], params: SamplingParams,
              layer_streamed: bool = False) -> list[list[int]]:
    """Prefill everything, move the KV (after the prefill, or layer by layer during it through
    `LLMEngine.stream_kv`), decode; returns each prompt's tokens."""
    sinks: dict[str, LayerCopier] = {}
    for i, p in enumerate(prompts):
        rid = f"q{i}"
        prefill.add_request(rid, p, params, prefill_only=True)
        if layer_streamed:
            sinks[rid] = LayerCopier(prefill, decode, decode.reserve(rid, len(p)))
            prefill.stream_kv(rid, sinks[rid])
    first: dict[str, int] = {}
    while prefill.has_unfinished():
        for out in prefill.step():
            assert out.finished and out.finish_reason == "prefilled"
            assert out.kv_block_ids == prefill.prefilled_blocks(out.request_id)[0]  # handed over with the output
            first[out.request_id] = out.new_token_ids[0]
    results: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        rid = f"q{i}"
        src, n_tokens = prefill.prefilled_blocks(rid)
        assert n_tokens == len(p)
        if layer_streamed:  # once per layer, only in the forward that completed the prompt
            assert sinks[rid].calls == list(range(1, prefill.spec.num_layers + 1))
        else:
            dst = decode.reserve(rid, n_tokens)
            assert dst is not None
            decode.kv_layout.scatter(decode.kv_cache, dst, prefill.kv_layout.gather(prefill.kv_cache, src))
        prefill.release_prefilled(rid)
        decode.add_prefilled_request(rid, p, first[rid], params)
        results[rid] = [first[rid]]
    while decode.has_unfinished():
        for out in decode.step():
            results[out.request_id].extend(out.new_token_ids)
    prefill.check_block_accounting()
    decode.check_block_accounting()
    for engine in (prefill, decode):
        stats = engine.stats()
        assert stats.num_free_blocks + stats.num_reserved_blocks == stats.num_total_blocks
    return [results[f"q{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_split_matches_generate(tiny_llama, temperature):
    params = SamplingParams(max_tokens=24, temperature=temperature, seed=11, ignore_eos=True)
    llm = LLM(str(tiny_llama), num_kv_blocks=256)
    prompts = ragged_prompts(llm.tokenizer.vocab_size, n=8)
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    prefill = LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=128))
    # Different block ids on the decode side: occupy some blocks first.
    decode = LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=200))
    assert decode.reserve("filler", 100) is not None
    assert run_split(prefill, decode, prompts, params) == expected
    decode.release_reservation("filler")


def test_decode_text_includes_first_token(tiny_llama):
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    llm = LLM(str(tiny_llama), num_kv_blocks=64)
    expected = llm.generate("Text from the first token on", params)[0]
    prefill = LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=64))
    decode = LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=64))
    ids = llm.tokenizer.encode("Text from the first token on")
    prefill.add_request("a", ids, params, prefill_only=True)
    (first,) = prefill.step()
    src, n = prefill.prefilled_blocks("a")
    dst = decode.reserve("a", n)
    decode.kv_layout.scatter(decode.kv_cache, dst, prefill.kv_layout.gather(prefill.kv_cache, src))
    decode.add_prefilled_request("a", ids, first.new_token_ids[0], params)
    text = ""
    while decode.has_unfinished():
        text += "".join(o.text_delta for o in decode.step())
    assert text == expected.text


def test_reservation_errors(tiny_llama):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=8, block_size=16))
    assert engine.reserve("big", 16 * 9) is None
    assert engine.reserve("ok", 30) is not None
    with pytest.raises(ValueError, match="already in use"):
        engine.reserve("ok", 3)
    with pytest.raises(ValueError, match="no reservation"):
        engine.add_prefilled_request("missing", [1, 2], 3, SamplingParams())
    with pytest.raises(ValueError, match="needs"):
        engine.add_prefilled_request("ok", [1] * 40, 3, SamplingParams())
    engine.check_block_accounting()
    assert engine.stats().num_free_blocks == 8


class LayerCopier:
    """A KV sink that copies each layer into the decode engine's reserved blocks the moment the prefill
    reports it ready: any layer reported before its KV is final would corrupt the decode."""

    def __init__(self, prefill: LLMEngine, decode: LLMEngine, dst: list[int]) -> None:
        self.prefill, self.decode, self.dst = prefill, decode, dst
        self.calls: list[int] = []

    def layers_ready(self, src_block_ids: list[int], upto: int) -> None:
        lo = self.calls[-1] if self.calls else 0
        self.calls.append(upto)
        data = self.prefill.kv_layout.gather(self.prefill.kv_cache, src_block_ids, (lo, upto))
        self.decode.kv_layout.scatter(self.decode.kv_cache, self.dst, data, (lo, upto))


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_layer_streamed_split_matches_generate(tiny_llama, chunked):
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    llm = LLM(str(tiny_llama), num_kv_blocks=256)
    prompts = ragged_prompts(llm.tokenizer.vocab_size, n=4)
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    limits = {"enable_chunked_prefill": True, "max_num_batched_tokens": 16} if chunked else {}
    prefill = LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=128, **limits))
    decode = LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=200))
    assert run_split(prefill, decode, prompts, params, layer_streamed=True) == expected
