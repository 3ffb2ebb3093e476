"""Self-healing on a real CPU cluster (local Ray, the launcher's own redis-server, router, 1 prefill + 1
decode worker over gloo), with no manual step: kill the only prefill worker, then the only decode worker:
a request in flight ends with a clear status within 2 s, and the launcher's supervisor starts a new worker
that registers, so the cluster serves again within 60 s; SIGKILL the redis-server: serving again within
15 s (restarted on its port, workers re-register, the router reconnects). Requests in between end with a
clear UNAVAILABLE. The cluster listens on all interfaces, as on Kubernetes: each worker, the replaced ones
too, advertises its own Ray node's IP.
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
LONG = {"max_tokens": 1000, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def harness(ray_session, tiny_llama):
    config = ClusterConfig(model=str(tiny_llama), prefill=1, decode=1, transport="gloo", host="0.0.0.0", port=0,
                           http_port=None, cluster_name="healing",
                           engine=EngineOptions(num_kv_blocks=128, max_model_len=2048))
    yield (h := ClusterHarness(config))
    h.close()


def serves_again_within(client: Client, limit_s: float) -> tuple[float, list[PdserveError]]:
    """Seconds until a request succeeds again, and the errors of those that did not meanwhile."""
    t0, errors = time.monotonic(), []
    while time.monotonic() - t0 < limit_s:
        try:
            result = client.generate([5] * 24, max_tokens=4, temperature=0.0, ignore_eos=True, timeout=5)
            assert len(result.token_ids) == 4
            return time.monotonic() - t0, errors
        except PdserveError as err:
            errors.append(err)
            time.sleep(0.3)
    raise AssertionError(f"not serving {limit_s}s later: {errors[-3:]}")


@pytest.mark.parametrize("role", ["prefill", "decode"])
@pytest.mark.timeout(150, func_only=True)
def test_killed_only_worker_of_a_role_is_replaced(harness, ray_session, role) -> None:
    index = next(i for i, w in enumerate(harness.cluster.worker_info) if w["role"] == role)
    with Client(harness.address, timeout=30) as client:
        stream = client.generate_stream([7] * (600 if role == "prefill" else 24), **LONG)
        if role == "decode":
            next(stream), next(stream)  # decoding
        ray_session.kill(harness.cluster.workers[index])
        t_kill = time.monotonic()
        with pytest.raises(PdserveError) as failed:
            for _ in stream:
                pass
        assert time.monotonic() - t_kill < 2.0 and failed.value.code in (grpc.StatusCode.UNAVAILABLE,
                                                                         grpc.StatusCode.ABORTED), failed.value
        took, errors = serves_again_within(client, 60.0)
    odd = [e for e in errors if e.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED) or not e.reason]
    assert not odd, odd[:3]
    assert harness.cluster.worker_supervisor.replaced >= 1
    node_ip = ray_session.util.get_node_ip_address()
    assert harness.cluster.worker_info[index]["address"].rsplit(":", 1)[0] == node_ip  # not 0.0.0.0
    harness.wait_all_blocks_free()


@pytest.mark.timeout(120, func_only=True)
def test_killed_redis_server_is_restarted_and_the_cluster_serves_again(harness) -> None:
    redis = harness.cluster.redis
    assert redis is not None and redis.pid is not None
    port, old_pid = redis.port, redis.pid
    with Client(harness.address, timeout=10) as client:
        assert len(client.generate([5] * 24, max_tokens=4, temperature=0.0, ignore_eos=True).token_ids) == 4
        os.kill(old_pid, signal.SIGKILL)
        _, errors = serves_again_within(client, 15.0)
    assert redis.port == port and redis.pid != old_pid
    assert all(e.code == grpc.StatusCode.UNAVAILABLE and e.reason for e in errors), errors[:3]
    harness.wait_all_blocks_free()
