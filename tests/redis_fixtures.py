"""Shared Redis fixtures: one real redis-server per test module, an isolated registry per test.

Expose them to every test module from tests/conftest.py with
`from tests.redis_fixtures import redis_server, redis_url, registry  # noqa: F401`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from cluster.redis_server import RedisServer
from cluster.registry import Registry


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A private, non-persistent redis-server for the module; stopped afterwards."""
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


def unique_cluster(prefix: str = "test") -> str:
    """A fresh cluster name, so tests sharing one server never see each other's keys."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def registry(redis_server: RedisServer) -> Iterator[Registry]:
    """A sync `Registry` on the module's server, under a cluster name of its own."""
    reg = Registry(redis_server.url, unique_cluster())
    yield reg
    reg.close()
