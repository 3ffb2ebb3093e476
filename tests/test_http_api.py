"""The router's OpenAI-compatible HTTP API over real HTTP on loopback, with the `openai` client and curl,
against scripted workers (tests/sdk_router_helpers.py): request/response shapes, SSE framing, statuses,
cancel on disconnect, /metrics. Real engines behind the same API: tests/test_http_cluster.py."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from router.http.chat_template import ChatTemplate
from tests.sdk_router_helpers import Cluster, wait_for

TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}a{% endif %}")
OUTPUT = "w4 w5 w6 w7"  # what the scripted workers generate: token 4 from prefill, 5 6 7 from decode


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("http-model")
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(["hello world how are you user a"],
                            trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "add_bos_token": True, "chat_template": TEMPLATE}))
    return d


@pytest.fixture
def make_cluster(redis_server, model_dir: Path) -> Iterator[Callable[..., Cluster]]:  # type: ignore[no-untyped-def]
    made: list[Cluster] = []

    def make(workers: bool = True, delay_s: float = 0.0, **config: object) -> Cluster:
        c = Cluster(redis_server.url, model_dir, http_port=0, served_model_name="tok", **config)
        made.append(c)
        if workers:
            c.add("p0", "prefill")
            c.add("d0", "decode", delay_s=delay_s)
            wait_for(lambda: c.router.serving, what="router never saw the workers")
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    return make_cluster()


def base_url(c: Cluster) -> str:
    return f"http://127.0.0.1:{c.router.http_port}"


def client(c: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url(c) + "/v1", api_key="none", max_retries=0)


def test_completions(cluster: Cluster) -> None:
    with client(cluster) as oc:
        model = oc.models.list().data[0].id
        r = oc.completions.create(model=model, prompt="hello world", max_tokens=8)
        assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.system_fingerprint
        assert [(c.index, c.text, c.finish_reason) for c in r.choices] == [(0, OUTPUT, "length")]
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 4, 7)  # <s> + 2
        # two prompts (text and token ids) x n=2: choice p * n + i, prompt tokens counted once per prompt
        r = oc.completions.create(model=model, prompt=[[1, 5], [1, 5, 6]], max_tokens=8, n=2, logprobs=1)
        assert [c.index for c in r.choices] == [0, 1, 2, 3] and {c.text for c in r.choices} == {OUTPUT}
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (5, 16)
        assert r.choices[0].logprobs.token_logprobs[0] == -0.5 and r.choices[0].logprobs.text_offset[0] == 0
        one = oc.completions.create(model=model, prompt="hello", max_tokens=1)
        assert one.choices[0].text == "w4" and one.choices[0].finish_reason == "length"
        ids = oc.completions.create(model=model, prompt="hello", max_tokens=8, extra_body={"return_token_ids": True})
        assert ids.choices[0].model_extra["token_ids"] == [4, 5, 6, 7]


def test_chat_stream_with_usage(cluster: Cluster) -> None:
    with client(cluster) as oc:
        chunks = list(oc.chat.completions.create(
            model="tok", messages=[{"role": "user", "content": "hello"}], stream=True,
            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == OUTPUT
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == 3  # "user hello a": the template's text, no BOS added
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert chunks[-2].choices[0].delta.content  # the finish reason rides the last content chunk


def test_async_chat_logprobs_and_timing(cluster: Cluster) -> None:
    async def go() -> openai.types.chat.ChatCompletion:
        async with openai.AsyncOpenAI(base_url=base_url(cluster) + "/v1", api_key="none", max_retries=0) as oc:
            return await oc.chat.completions.create(
                model="tok", messages=[{"role": "user", "content": [{"type": "text", "text": "how are you"}]}],
                logprobs=True, top_logprobs=0, max_completion_tokens=3, extra_body={"return_timing": True})

    r = asyncio.run(go())
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == "w4 w5 w6"
    assert r.choices[0].logprobs.content[0].logprob == -0.5 and r.choices[0].logprobs.content[0].top_logprobs == []
    assert r.choices[0].model_extra["timing"]["prefill_ms"] == 2.0


def test_errors_are_openai_errors(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster()
    with client(c) as oc:
        # what the gRPC API refuses (test_sdk_router.test_invalid_arguments), then what only HTTP can get wrong
        for bad, reason in (({"prompt": ""}, "prompt is empty"), ({"prompt": "hello " * 20}, "exceeds max_model_len"),
                            ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": 0}, "top_k"),
                            ({"max_tokens": 0}, "max_tokens"), ({"prompt": [1, 2, 100000]}, "out of the vocabulary"),
                            ({"prompt": [-3]}, "token id -3"), ({"logprobs": 21}, "logprobs"),
                            ({"seed": -1}, "seed"), ({"prompt": []}, "'prompt' must be"), ({"prompt": 5}, "'prompt'"),
                            ({"n": 0}, "'n'"), ({"stop": [1]}, "'stop'"), ({"max_tokens": "3"}, "'max_tokens'"),
                            ({"top_k": 2**40}, "'top_k' is out of range")):
            with pytest.raises(openai.BadRequestError) as info:
                oc.completions.create(model="tok", prompt="hello", max_tokens=16, extra_body=bad)
            assert info.value.status_code == 400 and reason in info.value.body["message"], (bad, info.value.body)
        with pytest.raises(openai.NotFoundError) as info:
            oc.completions.create(model="nope", prompt="hello")
        assert info.value.body["code"] == "model_not_found"
    r = requests.post(base_url(c) + "/v1/completions", data="{", timeout=5)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert requests.get(base_url(c) + "/v1/nothing", timeout=5).status_code == 404

    full = make_cluster(max_queue=0)
    r = requests.post(base_url(full) + "/v1/completions", json={"prompt": "hello"}, timeout=5)
    assert r.status_code == 429 and r.headers["Retry-After"] == "1" and "queue is full" in r.json()["error"]["message"]
    with client(full) as oc, pytest.raises(openai.RateLimitError):
        oc.chat.completions.create(model="tok", messages=[{"role": "user", "content": "hi"}], stream=True)

    empty = make_cluster(workers=False)
    assert requests.get(base_url(empty) + "/health", timeout=5).status_code == 503
    r = requests.post(base_url(empty) + "/v1/completions", json={"prompt": "hello"}, timeout=5)
    assert r.status_code == 503 and "no prefill and decode workers" in r.json()["error"]["message"]
    assert requests.get(base_url(c) + "/health", timeout=5).status_code == 200


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_sse_framing_with_curl(cluster: Cluster) -> None:
    out = subprocess.run(["curl", "-sN", base_url(cluster) + "/v1/completions", "-H", "Content-Type: application/json",
                          "-d", json.dumps({"prompt": "hello", "max_tokens": 4, "stream": True})],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    events = out.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == OUTPUT
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[0]


def test_disconnect_cancels_on_every_worker(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(delay_s=0.3)
    with requests.post(base_url(c) + "/v1/completions", stream=True, timeout=10,
                       json={"prompt": "hello", "max_tokens": 8, "stream": True}) as r:
        first = next(r.iter_lines())
        assert first.startswith(b"data: ")
        rid = json.loads(first[len(b"data: "):])["id"].removeprefix("cmpl-") + "-0"
    prefill, decode = c.workers
    wait_for(lambda: rid in decode.cancels and rid in prefill.cancels, what="no Cancel on both workers")


def test_metrics_count_requests(cluster: Cluster) -> None:
    with client(cluster) as oc:
        for i in range(3):
            oc.completions.create(model="tok", prompt="hello", max_tokens=2 + i)
    text = requests.get(base_url(cluster) + "/metrics", timeout=5).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted({"model_name": "tok", **labels}.items())))]

    assert value("pdserve:time_to_first_token_seconds_count") == 3
    assert value("pdserve:e2e_request_latency_seconds_count") == 3
    assert value("pdserve:generation_tokens_total") == 2 + 3 + 4
    assert value("pdserve:prompt_tokens_total") == 3 * 2
    assert value("pdserve:request_success_total", finished_reason="length") == 3
    assert value("pdserve:prefix_cache_queries_total", role="prefill", worker="p0") == 3 * 2
    assert 0 <= value("pdserve:kv_cache_usage_perc", role="decode", worker="d0") < 1  # no heartbeats here
    assert value("pdserve:num_requests_running", role="prefill", worker="p0") == 0
    assert value("pdserve:inter_token_latency_seconds_count") == (2 - 1) + (3 - 1) + (4 - 1)


def test_chat_template_renders_as_transformers_does() -> None:
    transformers = pytest.importorskip("transformers")
    from cluster.tokenizer import CHAT_TEMPLATE

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"}]
    chatml = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
              "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
              "{% endif %}")
    loops = ("{%- for m in messages %}\n  {%- if loop.index0 == 1 %}{% continue %}{% endif %}\n"
             "  [{{ m.role | upper }}] {{ m.content | tojson }}\n{%- endfor %}{{ eos_token }}")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1},
                                               unk_token="<s>")), bos_token="<s>", eos_token="</s>")
    for source in (CHAT_TEMPLATE, chatml, loops):
        for gen in (True, False):
            ours = ChatTemplate(source, {"bos_token": "<s>", "eos_token": "</s>"}).render(messages, gen)
            assert ours == tok.apply_chat_template(messages, chat_template=source, tokenize=False,
                                                   add_generation_prompt=gen)


MULTIPROC_SCRIPT = """
import asyncio, sys
from pdserve.v1 import generate_pb2 as pb
from router.metrics import RouterMetrics

async def one(metrics):
    async def responses():
        yield pb.GenerateResponse(delta=pb.Delta(token_ids=[1], text="a"))
        yield pb.GenerateResponse(final=pb.Final(finish_reason="stop", usage=pb.Usage(prompt_tokens=2,
                                  completion_tokens=1), timing=pb.Timing(ttft_ms=5, total_ms=9)))
    async for _ in metrics.track(responses()):
        pass

metrics = RouterMetrics("tok")
asyncio.run(one(metrics))
sys.stdout.write(metrics.exposition([]).decode())
"""


def test_metrics_sum_across_router_processes(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    outs = [subprocess.run([sys.executable, "-c", MULTIPROC_SCRIPT], env=env, capture_output=True, text=True,
                           check=True, cwd=Path(__file__).parent.parent).stdout for _ in range(2)]
    samples = {(s.name, s.labels.get("finished_reason")): s.value
               for f in text_string_to_metric_families(outs[1]) for s in f.samples}
    assert samples[("pdserve:time_to_first_token_seconds_count", None)] == 2  # both processes' requests
    assert samples[("pdserve:request_success_total", "stop")] == 2


def test_grafana_dashboard_queries_existing_series() -> None:
    import re

    from cluster.registry import WorkerInfo, WorkerLoad
    from router.metrics import RouterMetrics

    metrics = RouterMetrics("m")
    metrics.success.labels("m", "stop").inc()
    worker = (WorkerInfo("d0", "decode", "x:1", "m", "grpc", "", 10, 4), WorkerLoad(1, 2, 5))
    names = {s.name for f in text_string_to_metric_families(metrics.exposition([worker]).decode()) for s in f.samples}
    dashboard = (Path(__file__).parent.parent / "deploy" / "grafana" / "pdserve-dashboard.json").read_text()
    exprs = [t["expr"] for p in json.loads(dashboard)["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"pdserve:[a-z0-9_]+", e)}
    assert used and used <= names, used - names
