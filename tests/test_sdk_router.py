"""SDK + router over real gRPC on loopback and a real redis-server. Workers are small WorkerService
servers with scripted behaviour (real gRPC, no model; tests/sdk_router_helpers.py), so the orchestration,
statuses and cleanup are tested here; end-to-end tests with real engines live elsewhere."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pdserve
import pytest
from pdserve.errors import error_for
from pdserve.v1 import generate_pb2 as pb
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from cluster.cluster_config import ClusterConfig
from cluster.prefix_hash import chain_block_hashes, hash_block
from cluster.registry import WorkerInfo
from router.config import RouterConfig
from router.model_info import ModelInfo
from router.validation import (
    MAX_BYTES_PER_TOKEN,
    MAX_STOP_BYTES,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    max_request_bytes,
)
from tests.sdk_router_helpers import BLOCK, Cluster, wait_for

SENTENCES = ["the quick brown fox jumps over the lazy dog", "hello world how are you", "a b c d e f g"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenizer-only model directory: a WordLevel tokenizer trained on a few sentences."""
    d = tmp_path_factory.mktemp("tok-model")
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "add_bos_token": True}))
    return d


@pytest.fixture
def make_cluster(redis_server, model_dir: Path) -> Iterator[Callable[..., Cluster]]:  # type: ignore[no-untyped-def]
    made: list[Cluster] = []

    def make(**config: object) -> Cluster:
        made.append(Cluster(redis_server.url, model_dir, **config))
        return made[-1]

    yield make
    for c in made:
        c.close()


# --- standalone ---------------------------------------------------------------------------------------


def test_prefix_hashes_are_chained_full_blocks() -> None:
    ids = list(range(10))
    h = chain_block_hashes(ids, 4)
    assert len(h) == 2 and all(len(x) == 32 and int(x, 16) >= 0 for x in h)
    assert h == chain_block_hashes(ids[:8], 4) == chain_block_hashes(ids + [99], 4)[:2]
    assert h[1] == hash_block(hash_block(None, ids[:4]), ids[4:8])
    changed = chain_block_hashes([42, *ids[1:]], 4)
    assert changed[0] != h[0] and changed[1] != h[1]  # a change early changes every later hash
    assert chain_block_hashes(ids[4:8], 4)[0] != h[1]  # same block, different prefix
    assert chain_block_hashes([1, 2, 3], 4) == [] and chain_block_hashes([], 4) == []
    with pytest.raises(ValueError):
        chain_block_hashes(ids, 0)


def test_imports_stay_torch_free() -> None:
    code = ("import sys, pdserve, router.server, router.__main__; "
            "bad = [m for m in ('torch', 'transformers', 'ray') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_typed_errors_and_client_side_encoding() -> None:
    e = error_for(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
    assert isinstance(e, pdserve.ResourceExhaustedError) and isinstance(e, pdserve.PdserveError)
    assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "full" and "full" in str(e)
    assert type(error_for(grpc.StatusCode.DATA_LOSS, "x")) is pdserve.PdserveError
    with pdserve.Client("127.0.0.1:1") as c:
        with pytest.raises(pdserve.InvalidArgumentError, match="cannot encode"):
            c.generate([2**40])
        with pytest.raises(pdserve.InvalidArgumentError, match="prompt must be"):
            c.generate(3.5)  # type: ignore[arg-type]
        with pytest.raises(pdserve.UnavailableError) as info:
            c.generate("hello", timeout=2)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_requests_at_every_limit_fit_max_request_bytes(model_dir: Path) -> None:
    """The public guard refuses a message larger than `max_request_bytes` unparsed: it must bound every request
    validation could accept (prompt, stops, request id and model name all at their limits, negative ids and
    seeds in their 10-byte varints)."""
    model = ModelInfo.load(str(model_dir), max_model_len=32)
    sampling = pb.SamplingParams(max_tokens=-1, temperature=100.0, top_k=-1, top_p=1.0, seed=-1, ignore_eos=True,
                                 stop=["\u00e9" * (MAX_STOP_BYTES // 2)] * MAX_STOP_STRINGS,
                                 stop_token_ids=[-1] * MAX_STOP_TOKEN_IDS, logprobs=-1)
    prompts = {"text": "\u00e9" * (MAX_BYTES_PER_TOKEN * model.max_model_len // 2),
               "token_ids": pb.TokenIds(ids=[-1] * model.max_model_len)}
    for kind, prompt in prompts.items():
        req = pb.GenerateRequest(**{kind: prompt}, sampling=sampling, request_id="r" * 128, model=model.name)
        assert len(req.SerializeToString()) <= max_request_bytes(model), kind


def test_router_config_validation() -> None:
    with pytest.raises(ValueError, match="policy"):
        RouterConfig(model_dir="m", redis_url="redis://x", policy="random")
    with pytest.raises(ValueError, match="max_queue"):
        RouterConfig(model_dir="m", redis_url="redis://x", max_queue=-1)
    with pytest.raises(ValueError, match="migration_limit"):
        RouterConfig(model_dir="m", redis_url="redis://x", migration_limit=-1)
    with pytest.raises(ValueError, match="kv_failure_policy must be one of"):
        RouterConfig(model_dir="m", redis_url="redis://x", kv_failure_policy="retry")
    for bad in ({"migration_limit": -1}, {"kv_failure_policy": "retry"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ClusterConfig(**bad)
    with pytest.raises(ValueError, match="migration_limit"):  # YAML's types are checked too (no 1.5, no "1")
        ClusterConfig.from_dict({"migration_limit": "1"})
    assert ClusterConfig.from_dict({"migration_limit": 0, "kv_failure_policy": "fail"}).kv_failure_policy == "fail"


# --- router without workers ---------------------------------------------------------------------------


def test_no_workers_unavailable_and_not_serving(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster()
    assert c.client.health() == "NOT_SERVING"
    assert c.client.health("pdserve.v1.GenerateService") == "NOT_SERVING"
    info = c.client.server_info()
    assert (info.model, info.max_model_len, info.mode) == ("tok-model0", 32, "disaggregated")
    assert info.vocab_size > 10 and info.num_prefill_workers == info.num_decode_workers == 0
    with pytest.raises(pdserve.UnavailableError, match="no prefill and decode workers"):
        c.client.generate("hello world")


@pytest.mark.parametrize(("prompt", "kwargs", "reason"), [
    ("", {}, "prompt is empty"),
    ([], {}, "prompt is empty"),
    ("hello " * 20, {"max_tokens": 16}, "exceeds max_model_len"),
    ("hello", {"temperature": -1.0}, "temperature"),
    ("hello", {"top_p": 0.0}, "top_p"),
    ("hello", {"top_k": 0}, "top_k"),
    ("hello", {"max_tokens": 0}, "max_tokens"),
    ("hello", {"model": "gpt-9"}, "unknown model 'gpt-9'"),
    ([1, 2, 100000], {}, "token id 100000 at position 2 is out of the vocabulary"),
    ([-3], {}, "token id -3"),
    ("hello " * 8000, {}, "larger than any valid one"),  # refused before it is parsed
    ("hello", {"request_id": "has space"}, "request_id"),
])
def test_invalid_arguments(make_cluster, prompt, kwargs, reason) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster()
    with pytest.raises(pdserve.InvalidArgumentError) as info:
        c.client.generate(prompt, **kwargs)
    assert reason in info.value.reason and info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_queue_full_and_no_decode_room(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(max_queue=0)
    with pytest.raises(pdserve.ResourceExhaustedError, match="queue is full"):
        c.client.generate("hello")
    c = make_cluster(queue_timeout_s=1.0)  # the router asks again for room up to queue_timeout_s: within the deadline
    c.add("p0", "prefill")
    d = c.add("d0", "decode", free_blocks=0)
    c.client.wait_until_serving(timeout=5)
    with pytest.raises(pdserve.ResourceExhaustedError, match="no decode worker has room"):
        c.client.generate("hello world")
    assert d.calls == []


# --- orchestration with scripted workers --------------------------------------------------------------


def test_generate_and_stream(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster()
    p, d = c.add("p0", "prefill"), c.add("d0", "decode")
    c.client.wait_until_serving(timeout=5)
    r = c.client.generate("hello world", max_tokens=4, logprobs=1, request_id="req-1")
    assert (r.request_id, r.text, r.token_ids, r.finish_reason) == ("req-1", "w4 w5 w6 w7", [4, 5, 6, 7], "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 4)  # <s> hello world
    assert r.timing.prefill_ms == 2 and r.timing.kv_handoff_ms == 3 and r.timing.first_decode_step_ms == 0.5
    assert 0 < r.timing.ttft_ms <= r.timing.total_ms and r.ttft_s is not None and r.ttft_s <= r.total_s
    assert r.logprobs is not None and r.logprobs[0].logprob == -0.5
    assert (r.prefill_worker, r.decode_worker) == ("p0", "d0")
    assert [m for m, _ in d.calls] == ["Reserve", "Decode"] and p.calls == [("Prefill", "req-1")]
    assert c.registry.outstanding_blocks("d0") == 0 and not d.cancels and not p.cancels
    deltas = list(c.client.generate_stream([1, 5, 6], max_tokens=2))
    assert [x.token_ids for x in deltas[:-1]] == [[4], [5]] and deltas[-1].is_final
    info = c.client.server_info()
    assert (info.num_prefill_workers, info.num_decode_workers, info.transport, info.block_size) == (1, 1, "grpc", 4)

    async def use_async() -> pdserve.GenerateResult:
        async with pdserve.AsyncClient(c.router.address, timeout=10) as ac:
            assert await ac.health() == "SERVING"
            return await ac.generate("hello", max_tokens=1, temperature=0)

    r = asyncio.run(use_async())
    assert (r.token_ids, r.text, r.finish_reason, r.decode_worker) == ([4], "w4", "length", "")
    wait_for(lambda: d.cancels == [r.request_id])  # finished at prefill: the reservation is freed
    assert ("Decode", r.request_id) not in d.calls


def test_client_cancel_frees_both_workers(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster()
    p, d = c.add("p0", "prefill"), c.add("d0", "decode", tokens=tuple(range(5, 20)), delay_s=0.2)
    c.client.wait_until_serving(timeout=5)
    for delta in c.client.generate_stream("hello", max_tokens=16, request_id="gone"):
        assert delta.token_ids == [4]
        break
    wait_for(lambda: "gone" in d.cancels and "gone" in p.cancels)
    assert c.router.orchestrator.num_inflight == 0

    async def cancel_async() -> None:
        async with (pdserve.AsyncClient(c.router.address) as ac,
                    ac.generate_stream("hello", max_tokens=16, request_id="gone-async") as s):
            async for _ in s:
                break

    asyncio.run(cancel_async())
    wait_for(lambda: "gone-async" in d.cancels)
    with pytest.raises(pdserve.DeadlineExceededError):
        c.client.generate("hello", max_tokens=16, request_id="slow", timeout=0.5)
    wait_for(lambda: "slow" in d.cancels and c.router.orchestrator.num_inflight == 0)


def test_worker_failures_map_to_statuses(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster()
    c.add("p0", "prefill", prefill_code=grpc.StatusCode.ABORTED)
    d = c.add("d0", "decode")
    with pytest.raises(pdserve.AbortedError, match="KV handoff failed"):
        c.client.generate("hello", request_id="abort-1")
    wait_for(lambda: "abort-1" in d.cancels)
    assert c.registry.outstanding_blocks("d0") == 0

    c = make_cluster()
    c.add("p0", "prefill")
    dead = WorkerInfo("d-dead", "decode", "127.0.0.1:1", "tiny", "grpc", "", 100, BLOCK)
    c.registry.register(dead, ttl_s=60)
    with pytest.raises(pdserve.UnavailableError, match="d-dead"):
        c.client.generate("hello")


def test_decode_retry_and_prefill_policies(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(policy="round_robin")
    full = c.add("d0", "decode", free_blocks=100, reserve_code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    c.add("d1", "decode", free_blocks=50)
    c.add("p0", "prefill")
    c.add("p1", "prefill")
    used = {c.client.generate("hello").prefill_worker for _ in range(4)}
    assert used == {"p0", "p1"}
    assert full.calls and c.client.generate("hello").decode_worker == "d1"

    c = make_cluster(policy="prefix_aware")
    c.add("d0", "decode")
    c.add("p0", "prefill")
    c.add("p1", "prefill")
    prompt = list(range(3, 12))  # two full blocks
    first = c.client.generate(prompt).prefill_worker
    assert all(c.client.generate(prompt + [3]).prefill_worker == first for _ in range(3))


def test_registry_down_is_unavailable(model_dir: Path) -> None:
    c = Cluster("redis://127.0.0.1:1/0", model_dir)  # nothing listens there
    try:
        assert c.client.health() == "NOT_SERVING"
        with pytest.raises(pdserve.UnavailableError, match="registry"):
            c.client.generate("hello")
    finally:
        c.close()


def test_shutdown_bounds_stuck_cleanups(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(cancel_timeout_s=0.2)
    c.loop.call_soon_threadsafe(c.router.orchestrator._spawn, asyncio.sleep(3600))  # a cleanup that never ends
    t0 = time.monotonic()
    c._run(c.router.orchestrator.close())
    assert time.monotonic() - t0 < 3.0  # cancel_timeout_s + 1 s, not the hour the cleanup would take
    wait_for(lambda: not c.router.orchestrator._cleanups, what="the stuck cleanup was not cancelled")
