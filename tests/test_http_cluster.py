"""The OpenAI-compatible HTTP API in front of a real cluster on CPU (local Ray, redis-server, 1 prefill + 1
decode worker, gRPC KV transport), with the `openai` client: greedy text over HTTP equals the gRPC SDK's and
the offline engine's; chat through the built-in chat template; a client that disconnects frees every KV
block; /metrics counts what the clients received."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
import requests
from pdserve import Client
from prometheus_client.parser import text_string_to_metric_families

from cluster.cluster_config import ClusterConfig, EngineOptions
from cluster.engine import LLM, SamplingParams
from router.http.chat_template import ChatTemplate
from router.model_info import ModelInfo
from tests.cluster_harness import ClusterHarness
from tests.sdk_router_helpers import wait_for

pytestmark = pytest.mark.slow
PROMPTS = ["The river runs", "Tell me about the sea", "Mountains are"]
GREEDY = {"temperature": 0.0, "max_tokens": 10, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def harness(ray_session, tiny_llama):
    config = ClusterConfig(model=str(tiny_llama), prefill=1, decode=1, transport="grpc", port=0, http_port=0,
                           cluster_name="http-e2e", engine=EngineOptions(num_kv_blocks=64, max_num_seqs=8))
    h = ClusterHarness(config)
    yield h
    h.close()


@pytest.fixture(scope="module")
def url(harness: ClusterHarness) -> str:
    return harness.cluster.http_url  # type: ignore[return-value]


@pytest.fixture(scope="module")
def oc(url: str):
    with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def model(oc: openai.OpenAI) -> str:
    return oc.models.list().data[0].id


def test_greedy_text_equals_grpc_and_offline(harness: ClusterHarness, oc: openai.OpenAI, model: str,
                                             tiny_llama) -> None:
    r = oc.completions.create(model=model, prompt=PROMPTS, **GREEDY)
    offline = LLM(str(tiny_llama), num_kv_blocks=64).generate(
        PROMPTS, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    with Client(harness.address) as client:
        grpc_texts = [client.generate(p, max_tokens=10, temperature=0, ignore_eos=True).text for p in PROMPTS]
    assert [c.text for c in r.choices] == grpc_texts == [o.text for o in offline]
    assert r.usage.completion_tokens == 30
    by_ids = oc.completions.create(model=model, prompt=offline[0].prompt_token_ids, **GREEDY)
    assert by_ids.choices[0].text == offline[0].text
    stop = offline[0].text[3:6]  # a stop string inside the output cuts it there
    cut = oc.completions.create(model=model, prompt=PROMPTS[0], stop=[stop], **GREEDY).choices[0]
    assert cut.finish_reason == "stop" and offline[0].text.startswith(cut.text) and stop not in cut.text


def test_chat_uses_the_builtin_template(harness: ClusterHarness, oc: openai.OpenAI, model: str,
                                        tiny_llama) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about rivers"}]
    r = oc.chat.completions.create(model=model, messages=messages, **GREEDY)  # type: ignore[arg-type]
    text = ChatTemplate.load(tiny_llama).render(messages)
    assert text.endswith("user: Tell me about rivers\nassistant:")
    ids = ModelInfo.load(str(tiny_llama), max_model_len=256).tokenizer.encode(text, add_special_tokens=False)
    with Client(harness.address) as client:
        expected = client.generate(ids, max_tokens=10, temperature=0, ignore_eos=True)
    assert r.choices[0].message.content == expected.text and r.usage.prompt_tokens == len(ids)


def test_streamed_n_choices_equal_unstreamed(url: str, model: str) -> None:
    async def go() -> tuple[list[str], list[str], openai.types.CompletionUsage]:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as client:
            args = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "n": 3, "seed": 7,
                    "temperature": 0.9, "max_tokens": 8}
            whole = await client.chat.completions.create(**args)  # type: ignore[call-overload]
            parts = ["", "", ""]
            usage = None
            async for chunk in await client.chat.completions.create(  # type: ignore[call-overload]
                    **args, stream=True, stream_options={"include_usage": True}):
                for c in chunk.choices:
                    parts[c.index] += c.delta.content or ""
                usage = chunk.usage or usage
        return [c.message.content for c in whole.choices], parts, usage

    whole, streamed, usage = asyncio.run(go())
    assert whole == streamed and len(set(whole)) > 1  # seed + choice index: the choices differ, reproducibly
    assert usage.completion_tokens == 24


def test_disconnect_mid_stream_frees_every_block(harness: ClusterHarness, url: str) -> None:
    body = {"prompt": "A long story", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith(b"data: ")
        assert any(line.startswith(b"data: ") for line in lines)  # a second token: decode is running
    harness.wait_all_blocks_free()


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_metrics_match_what_clients_received(url: str, oc: openai.OpenAI, model: str, tiny_llama) -> None:
    m = (("model_name", model),)
    before = _samples(url)
    got = [oc.completions.create(model=model, prompt=p, max_tokens=3 + i, temperature=0)
           for i, p in enumerate(PROMPTS)]
    after = _samples(url)

    def delta(name: str) -> float:
        return after[(name, m)] - before.get((name, m), 0.0)

    assert delta("pdserve:time_to_first_token_seconds_count") == len(PROMPTS)
    assert delta("pdserve:e2e_request_latency_seconds_count") == len(PROMPTS)
    assert delta("pdserve:generation_tokens_total") == sum(r.usage.completion_tokens for r in got)
    assert delta("pdserve:prompt_tokens_total") == sum(r.usage.prompt_tokens for r in got)
    assert delta("pdserve:kv_handoff_time_seconds_count") == sum(r.usage.completion_tokens > 1 for r in got)
    import torch

    from cluster.engine.kv_layout import KVLayout
    from cluster.engine.models.loader import read_model_spec

    spec = read_model_spec(str(tiny_llama))
    per_block = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, 16, torch.float32).bytes_per_block
    moved = sum(-(-r.usage.prompt_tokens // 16) for r in got if r.usage.completion_tokens > 1)  # whole blocks
    assert delta("pdserve:kv_handoff_bytes_total") == moved * per_block > 0

    def idle() -> bool:
        usage = [v for (name, _), v in _samples(url).items() if name == "pdserve:kv_cache_usage_perc"]
        return len(usage) == 2 and all(v == 0.0 for v in usage)

    wait_for(idle, timeout=10, what="KV usage did not return to 0")
    assert json.loads(requests.get(url + "/health", timeout=5).text) == {}


def test_bench_serve_drives_the_http_api(url: str, tiny_llama, tmp_path) -> None:
    from cluster.cli import main

    rc = main(["bench", "serve", "--backend", "openai", "--target", url, "--model", str(tiny_llama),
               "--num-prompts", "6", "--request-rate", "inf", "--input-range", "8,24", "--output-range", "4,10",
               "--num-warmups", "1", "--out", str(tmp_path)])
    assert rc == 0
    (run,) = tmp_path.glob("serve-*")
    data = json.loads((run / "rate-inf.json").read_text())
    assert (data["metrics"]["completed"], data["metrics"]["failed"]) == (6, 0)
    rows = data["requests"]
    assert all(r["output_tokens"] == r["max_tokens"] and r["num_deltas"] >= 1 for r in rows)
    assert all(r["server_ms"]["prefill_ms"] > 0 for r in rows)  # the server's timing, through return_timing
