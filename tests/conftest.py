"""Shared fixtures: tiny random-weight models of each architecture, made once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.redis_fixtures import redis_server, redis_url, registry  # noqa: F401

# Two cores run several test processes (Ray workers, transports): one thread each avoids
# oversubscribed OpenMP spinning, which makes small matmuls 100x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

ARCHS = ("llama", "qwen2", "mistral")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory: pytest.TempPathFactory):
    """make(arch) -> path of a tiny random checkpoint (cached per arch for the session)."""
    from cluster.engine.make_model import make_model

    made: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in made:
            made[arch] = make_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch, shape="tiny", seed=0)
        return made[arch]

    return make


@pytest.fixture(scope="session")
def tiny_llama(model_factory) -> Path:
    return model_factory("llama")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the session, with logical GPUs so workers are placed as on a GPU box."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, num_gpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
