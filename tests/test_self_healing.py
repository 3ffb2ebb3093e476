"""Self-healing on a real CPU cluster (local Ray, the launcher's own redis-server, router, 1 prefill + 1
decode worker over gloo): SIGKILL the redis-server and the cluster serves again within 15 s with no manual
step (the launcher restarts it on its port, workers re-register, the router reconnects); requests in
between end with a clear UNAVAILABLE.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
from pdserve import Client
from pdserve.errors import PdserveError

from cluster.cluster_config import ClusterConfig, EngineOptions
from tests.cluster_harness import ClusterHarness

pytestmark = pytest.mark.slow


@pytest.mark.timeout(180, func_only=True)
def test_killed_redis_server_is_restarted_and_the_cluster_serves_again(ray_session, tiny_llama) -> None:
    config = ClusterConfig(model=str(tiny_llama), prefill=1, decode=1, transport="gloo", port=0, http_port=None,
                           cluster_name="healing", engine=EngineOptions(num_kv_blocks=128))
    harness = ClusterHarness(config)
    try:
        redis = harness.cluster.redis
        assert redis is not None and redis.pid is not None
        port, old_pid = redis.port, redis.pid
        with Client(harness.address, timeout=10) as client:
            assert len(client.generate([5] * 24, max_tokens=4, temperature=0.0, ignore_eos=True).token_ids) == 4
            os.kill(old_pid, signal.SIGKILL)
            t_kill, errors = time.monotonic(), []
            while time.monotonic() - t_kill < 15:
                try:
                    result = client.generate([5] * 24, max_tokens=4, temperature=0.0, ignore_eos=True, timeout=5)
                    break
                except PdserveError as err:
                    errors.append(err)
                    time.sleep(0.2)
            else:
                raise AssertionError(f"not serving 15 s after the kill: {errors[-3:]}")
        assert len(result.token_ids) == 4
        assert redis.port == port and redis.pid != old_pid
        assert all(e.code == grpc.StatusCode.UNAVAILABLE and e.reason for e in errors), errors[:3]
        harness.wait_all_blocks_free()
    finally:
        harness.close()
