"""The end-to-end check on 2 GPUs of one host: 1 prefill + 1 decode worker, one GPU each, KV over NCCL and
over CUDA IPC; 32 concurrent requests through the SDK equal the offline engine token for token (float32).

    python -m pytest -m gpu tests/test_cluster_gpu.py -s
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import torch

from cluster.cluster_config import ClusterConfig, EngineOptions
from cluster.engine import LLM
from tests.cluster_harness import ClusterHarness
from tests.test_cluster_e2e import PROMPTS, _generate_all, request_params

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def gpu_ray():
    import ray

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=8, num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def offline_gpu(tiny_llama, gpu_ray):
    llm = LLM(str(tiny_llama), device="cuda", dtype="float32", num_kv_blocks=512, max_model_len=1024)
    outs = [o.token_ids for o in llm.generate(PROMPTS, [request_params(i) for i in range(len(PROMPTS))])]
    del llm
    torch.cuda.empty_cache()
    return outs


@pytest.mark.parametrize("transport", ["nccl", "cuda_ipc"])
def test_two_gpu_cluster_matches_offline(tiny_llama, offline_gpu, transport):
    config = ClusterConfig(model=str(tiny_llama), device="cuda", prefill=1, decode=1, transport=transport, port=0,
                           http_port=0, cluster_name=f"gpu-{transport}", cpus_per_worker=2,
                           engine=EngineOptions(dtype="float32", num_kv_blocks=512, max_model_len=1024,
                                                max_num_seqs=64))
    harness = ClusterHarness(config)
    try:
        got = asyncio.run(_generate_all(harness.address))
        stats = harness.wait_all_blocks_free()
    finally:
        harness.close()
    same = sum(a == b for a, b in zip(got, offline_gpu, strict=True))
    out = os.environ.get("PDSERVE_RESULTS_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"gpu_cluster_{transport}.json").write_text(json.dumps({
            "transport": transport, "requests": len(PROMPTS), "equal_to_offline": same,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}, indent=2))
    print(f"\n{transport}: {same}/{len(PROMPTS)} equal to offline; workers: {[s.worker_id for s in stats]}")
    assert got == offline_gpu
