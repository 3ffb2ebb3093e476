"""A request continued on other engines after k of its tokens (what the router does when it migrates one:
prefill prompt + the k tokens sent, hand the KV over, decode on) equals the uninterrupted request: the same
tokens, the same text (held-back stop-string prefixes and stop strings across the cut included), the same
finish reason, for every cut k; seeded sampling draws the same tokens after the cut."""

from __future__ import annotations

import pytest

from cluster.config import EngineConfig
from cluster.engine import LLMEngine, SamplingParams, StepOutput

PROMPT = "Tell me about the rivers and the mountains"


def _run(engine: LLMEngine) -> list[StepOutput]:
    outs: list[StepOutput] = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    return outs


def uninterrupted(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list[StepOutput]:
    engine.add_request("ref", prompt, params)
    outs = _run(engine)
    assert all(len(o.new_token_ids) == 1 for o in outs)
    return outs


def continued(prefill: LLMEngine, decode: LLMEngine, prompt: list[int], sent: list[int], params: SamplingParams,
              rid: str) -> tuple[list[int], str, str | None]:
    """The tokens, text and finish reason the client sees after the cut: prefill of prompt + `sent` (counted
    as output) on `prefill`, the KV moved to `decode`, decode on."""
    tokens = prompt + sent
    prefill.add_request(rid, tokens, params, prefill_only=True, num_output_tokens=len(sent))
    (first,) = _run(prefill)
    if first.finish_reason != "prefilled":  # the first token after the cut ended it: its text is the prefill's
        prefill.release_prefilled(rid)
        return first.new_token_ids, first.text_delta, first.finish_reason
    src, n = prefill.prefilled_blocks(rid)
    assert n == len(tokens)
    dst = decode.reserve(rid, n)
    assert dst is not None
    decode.kv_layout.scatter(decode.kv_cache, dst, prefill.kv_layout.gather(prefill.kv_cache, src))
    prefill.release_prefilled(rid)
    decode.add_prefilled_request(rid, tokens, first.new_token_ids[0], params, num_output_tokens=len(sent))
    outs = _run(decode)
    return (first.new_token_ids + [t for o in outs for t in o.new_token_ids], "".join(o.text_delta for o in outs),
            outs[-1].finish_reason)


@pytest.fixture(scope="module")
def engines(tiny_llama):
    make = lambda blocks: LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=blocks))  # noqa: E731
    return make(64), make(64), make(80)  # reference, prefill (prefix cache on), decode


def _check_every_cut(engines, params: SamplingParams) -> list[StepOutput]:
    ref, prefill, decode = engines
    prompt = ref.tokenizer.encode(PROMPT)
    outs = uninterrupted(ref, prompt, params)
    tokens = [o.new_token_ids[0] for o in outs]
    for k in range(1, len(tokens)):
        got_tokens, got_text, reason = continued(prefill, decode, prompt, tokens[:k], params, f"cut-{k}")
        assert tokens[:k] + got_tokens == tokens, f"cut after {k} tokens"
        assert "".join(o.text_delta for o in outs[:k]) + got_text == "".join(o.text_delta for o in outs), k
        assert reason == outs[-1].finish_reason, k
    for engine in engines:
        engine.check_block_accounting()
        assert engine.stats().num_free_blocks == engine.stats().num_total_blocks
    return outs


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=14, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_every_cut_continues_the_same_stream(engines, params):
    _check_every_cut(engines, params)


def test_stop_strings_hold_back_and_match_across_the_cut(engines):
    """A stop string made of the end of one token's text and the start of a later one's: whatever the cut,
    the held-back text goes out once, and the stop ends the stream where the uninterrupted one ends."""
    ref = engines[0]
    free = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
    outs = uninterrupted(ref, ref.tokenizer.encode(PROMPT), free)
    pieces = [o.text_delta for o in outs]
    j = next(i for i in range(len(pieces) // 2, len(pieces) - 2) if len(pieces[i]) >= 2 and pieces[i + 1])
    stop = pieces[j][-2:] + pieces[j + 1][:1]  # spans the boundary between tokens j and j + 1
    assert "".join(pieces).find(stop) > len(stop), "text before the stop: the cut must not hold all of it back"
    held = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, stop=(stop,))
    stopped = _check_every_cut(engines, held)
    assert stopped[-1].finish_reason == "stop" and len(stopped) < len(outs)
    assert "".join(o.text_delta for o in stopped) == "".join(pieces).split(stop)[0]


def test_continuation_arguments_are_checked(engines):
    _, prefill, decode = engines
    params = SamplingParams(max_tokens=4, temperature=0.0)
    for bad in (-1, 3, 4):  # negative, the whole token list, max_tokens already reached
        with pytest.raises(ValueError, match="num_output_tokens"):
            prefill.add_request("bad", [5, 6, 7], params, num_output_tokens=bad)
    assert decode.reserve("bad", 3) is not None
    with pytest.raises(ValueError, match="num_output_tokens"):
        decode.add_prefilled_request("bad", [5, 6, 7], 8, params, num_output_tokens=3)
    assert "bad" not in decode._reservations  # the failed claim gave the blocks back
    decode.check_block_accounting()
