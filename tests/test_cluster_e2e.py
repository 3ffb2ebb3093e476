"""End to end on CPU: local Ray, real redis-server, router, 2 prefill + 2 decode workers, the SDK.

Outputs through the cluster equal the offline engine's token for token, for the torch.distributed (gloo)
and the gRPC KV transports.
"""

from __future__ import annotations

import asyncio

import pytest
from pdserve import AsyncClient, Client

from cluster.cluster_config import ClusterConfig, EngineOptions
from cluster.engine import LLM, SamplingParams
from tests.cluster_harness import ClusterHarness

pytestmark = pytest.mark.slow

PROMPTS = [f"Request number {i}: tell me about {'rivers' if i % 3 else 'mountains and the sea'}" + " again" * (i % 5)
           for i in range(32)]


def request_params(i: int) -> SamplingParams:
    if i % 4 == 3:  # seeded sampling is batch-independent, so it must match too
        return SamplingParams(max_tokens=8 + i % 9, temperature=0.9, top_p=0.9, seed=100 + i, ignore_eos=True)
    return SamplingParams(max_tokens=8 + i % 17, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def offline(tiny_llama):
    llm = LLM(str(tiny_llama), num_kv_blocks=512)
    return [o.token_ids for o in llm.generate(PROMPTS, [request_params(i) for i in range(len(PROMPTS))])]


@pytest.fixture(scope="module", params=["gloo", "grpc"])
def harness(request, ray_session, tiny_llama):
    config = ClusterConfig(model=str(tiny_llama), prefill=2, decode=2, transport=request.param, port=0, http_port=0,
                           cluster_name=f"e2e-{request.param}", max_queue=48,
                           engine=EngineOptions(num_kv_blocks=96, max_num_seqs=32))
    h = ClusterHarness(config)
    yield h
    h.close()


async def _generate_all(address: str) -> list[list[int]]:
    async with AsyncClient(address, timeout=120) as client:
        results = await asyncio.gather(*(
            client.generate(p, max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p, seed=sp.seed,
                            ignore_eos=True) for p, sp in zip(PROMPTS, map(request_params, range(32)), strict=True)))
    return [r.token_ids for r in results]


def test_concurrent_requests_match_offline(harness, offline):
    got = asyncio.run(_generate_all(harness.address))
    assert got == offline
    stats = harness.wait_all_blocks_free()
    assert {s.role for s in stats} == {"prefill", "decode"} and len(stats) == 4
    # prefill workers keep a prefix cache; decode workers keep none (their prompts arrive as KV)
    assert all((s.num_prefix_cached_blocks > 0) == (s.role == "prefill") for s in stats)


def test_text_matches_offline(harness, tiny_llama):
    llm = LLM(str(tiny_llama), num_kv_blocks=64)
    for max_tokens in (1, 12):
        expected = llm.generate("Text check", SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))[0]
        with Client(harness.address) as client:
            stream = client.generate_stream("Text check", max_tokens=max_tokens, temperature=0, ignore_eos=True)
            text = "".join(d.text for d in stream)
        assert text == expected.text == stream.result().text


def test_stream_reports_timing_and_workers(harness):
    with Client(harness.address) as client:
        stream = client.generate_stream("Timing please", max_tokens=6, temperature=0, ignore_eos=True)
        deltas = list(stream)
        result = stream.result()
    assert sum(len(d.token_ids) for d in deltas) == 6 == len(result.token_ids)
    assert result.finish_reason == "length"
    assert result.prefill_worker.startswith("prefill-") and result.decode_worker.startswith("decode-")
    timing = result.timing
    assert timing.ttft_ms > 0 and timing.prefill_ms > 0 and timing.total_ms >= timing.ttft_ms
    assert result.usage.completion_tokens == 6


def test_first_token_can_end_the_request(harness):
    with Client(harness.address) as client:
        result = client.generate("Just one token", max_tokens=1, temperature=0)
    assert len(result.token_ids) == 1 and result.finish_reason == "length"
    harness.wait_all_blocks_free()
