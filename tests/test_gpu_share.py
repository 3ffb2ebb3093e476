"""Fractional-GPU workers (`gpus_per_worker`): config checks, GPUs occupied, transports, the engine's memory share.

The CUDA budget itself runs only on a GPU; its arithmetic (`EngineConfig.kv_cache_budget`) is pure and
checked here with device sizes of an H200.
"""

from __future__ import annotations

import argparse

import pytest

from cluster.cluster_config import ClusterConfig
from cluster.config import EngineConfig
from cluster.serve import add_up_args, config_from_args

GIB = 2**30
H200 = 141 * GIB


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_gpus_per_worker_must_be_a_share_of_one_gpu(share):
    with pytest.raises(ValueError, match="gpus_per_worker"):
        ClusterConfig(gpus_per_worker=share)
    with pytest.raises(ValueError, match="device_share"):
        EngineConfig(model="m", device_share=share)


def test_nccl_cannot_join_workers_on_one_gpu():
    with pytest.raises(ValueError, match="nccl"):
        ClusterConfig(device="cuda", transport="nccl", gpus_per_worker=0.5)
    ClusterConfig(device="cuda", transport="nccl", gpus_per_worker=0.5, mode="colocated")  # no KV moves: fine
    half = ClusterConfig(device="cuda", gpus_per_worker=0.5)
    assert half.resolved_transport(one_host=True) == "cuda_ipc"
    assert half.resolved_transport(one_host=False) == "grpc"
    assert ClusterConfig(device="cuda").resolved_transport(one_host=False) == "nccl"


@pytest.mark.parametrize(("share", "prefill", "decode", "gpus"),
                         [(1.0, 1, 1, 2), (0.5, 1, 1, 1), (0.5, 2, 1, 2), (1 / 3, 2, 1, 1), (0.4, 2, 1, 2),
                          (0.25, 3, 5, 2)])
def test_gpus_occupied(share, prefill, decode, gpus):
    assert ClusterConfig(gpus_per_worker=share, prefill=prefill, decode=decode).num_gpus() == gpus


def test_engine_config_carries_the_share():
    config = ClusterConfig.from_dict({"device": "cuda", "gpus_per_worker": 0.5,
                                      "engine": {"gpu_memory_utilization": 0.9, "max_num_seqs": 8}})
    engine = config.engine_config("/models/m", seed=3)
    assert (engine.device_share, engine.gpu_memory_utilization, engine.max_num_seqs, engine.seed) == (0.5, 0.9, 8, 3)
    assert engine.device == "cuda" and engine.model == "/models/m"
    assert ClusterConfig().engine_config("m", 0).device_share == 1.0


def test_up_flags():
    parser = argparse.ArgumentParser()
    add_up_args(parser)
    config = config_from_args(parser.parse_args(["--gpus-per-worker", "0.5", "--router-processes", "3"]))
    assert config.gpus_per_worker == 0.5 and config.router_processes == 3
    assert config_from_args(parser.parse_args([])) == ClusterConfig()


def test_budget_is_a_share_of_the_total_less_what_the_engine_holds():
    engine = EngineConfig(model="m", device="cuda", gpu_memory_utilization=0.8, device_share=0.5)
    weights = 3 * GIB
    budget = engine.kv_cache_budget(total_bytes=H200, free_bytes=H200 - weights, held_bytes=weights)
    assert budget == int(H200 * 0.8 * 0.5 - weights)
    whole = EngineConfig(model="m", device="cuda", gpu_memory_utilization=0.8)
    assert whole.kv_cache_budget(H200, H200 - weights, weights) == int(H200 * 0.8 - weights)


def test_two_engines_starting_at_once_never_over_commit():
    """Both measure the device before either allocates its cache: each takes its own share, and the two
    together stay within total x utilization."""
    engine = EngineConfig(model="m", device="cuda", gpu_memory_utilization=0.9, device_share=0.5)
    weights, context = 16 * GIB, GIB // 2
    free = H200 - 2 * (weights + context)
    first = engine.kv_cache_budget(H200, free, weights)
    second = engine.kv_cache_budget(H200, free, weights)
    assert first == second and 2 * (first + weights) <= H200 * 0.9
    # the second one measures after the first allocated: the same share, still fits in what is free
    assert engine.kv_cache_budget(H200, free - first, weights) == second <= free - first


def test_budget_is_capped_by_what_is_free():
    engine = EngineConfig(model="m", device="cuda", gpu_memory_utilization=0.9, device_share=0.5)
    free = 40 * GIB  # another process holds most of the device
    assert engine.kv_cache_budget(H200, free, 2 * GIB) == int(free - H200 * 0.5 * 0.1)


def test_no_room_is_a_clear_error():
    engine = EngineConfig(model="m", device="cuda", gpu_memory_utilization=0.5, device_share=0.25)
    with pytest.raises(ValueError, match=r"no memory left for the KV cache.*holds 20\.00 GiB.*gpus_per_worker"):
        engine.kv_cache_budget(H200, H200 - 20 * GIB, 20 * GIB)  # the weights alone exceed 141 x 0.5 x 0.25
    with pytest.raises(ValueError, match="no memory left"):
        engine.kv_cache_budget(H200, GIB, GIB)  # share left, but the device is full
