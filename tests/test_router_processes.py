"""Several router processes on one port (SO_REUSEPORT), and fractional-GPU workers, in a real cluster.

Router children are real spawned processes: one that cannot start fails loudly, none outlives its launcher
(even one killed with SIGKILL), and with the in-process router gone the child alone serves the port.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from pdserve import Client

from cluster.cluster_config import ClusterConfig, EngineOptions, default_router_processes
from cluster.engine import LLM, SamplingParams
from router.config import RouterConfig
from router.process import RouterProcess, check_port_free
from tests.cluster_harness import ClusterHarness

NO_REDIS = "redis://127.0.0.1:1/0"  # the router starts without its registry (health says NOT_SERVING)


def _listens_on(pid: int, port: int) -> bool:
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
               for c in psutil.Process(pid).net_connections(kind="tcp"))


def _wait_gone(pid: int, timeout_s: float = 15.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


def test_default_router_processes_follow_the_host():
    assert [default_router_processes(n) for n in (1, 2, 7, 8, 16, 64)] == [1, 1, 1, 2, 4, 4]
    assert 1 <= ClusterConfig().num_router_processes() <= 4
    assert ClusterConfig(router_processes=3).num_router_processes() == 3
    with pytest.raises(ValueError, match="router_processes"):
        ClusterConfig(router_processes=0)


def test_python_m_router_processes_flag():
    from router.__main__ import parse_args

    config, n = parse_args(["--model", "m", "--redis-url", NO_REDIS, "--processes", "3"])
    assert n == 3 and config.reuse_port
    config, n = parse_args(["--model", "m", "--redis-url", NO_REDIS])
    assert n == 1 and not config.reuse_port
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--redis-url", NO_REDIS, "--processes", "0"])


def test_router_process_that_cannot_bind_fails_clearly(tiny_llama):
    with socket.socket() as held:  # a plain listener (no SO_REUSEPORT): nobody may share its port
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        child = RouterProcess(RouterConfig(model_dir=str(tiny_llama), redis_url=NO_REDIS, port=port, reuse_port=True))
        with pytest.raises(RuntimeError, match=rf"router process \d+ failed to start: .*cannot bind 127.0.0.1:{port}"):
            asyncio.run(child.wait_ready())
        asyncio.run(child.stop())
    assert _wait_gone(child.pid)


def test_a_port_in_use_is_refused_before_sharing_it():
    """Another router group (SO_REUSEPORT) on the port would accept a second group's bind: look first."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"router cannot bind 127.0.0.1:{port}: Address already in use"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # free again
    check_port_free("127.0.0.1", 0)


def test_cluster_with_router_processes_refuses_a_taken_port_before_starting_anything(tiny_llama):
    from cluster.launcher import Cluster

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        config = ClusterConfig(model=str(tiny_llama), port=other.getsockname()[1], router_processes=2)
        with pytest.raises(ValueError, match="--port / port: .*router cannot bind"):
            asyncio.run(Cluster.start(config, progress=False))


def test_router_process_does_not_outlive_a_killed_launcher(tiny_llama):
    launcher = textwrap.dedent(f"""
        import asyncio, sys
        from router.config import RouterConfig
        from router.process import RouterProcess, check_port_free

        async def main():
            child = RouterProcess(RouterConfig(model_dir={str(tiny_llama)!r}, redis_url={NO_REDIS!r}, reuse_port=True))
            port = await child.wait_ready()
            print(child.pid, port, flush=True)
            await asyncio.sleep(3600)

        if __name__ == "__main__":
            asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    try:
        pid, port = map(int, proc.stdout.readline().split())
        assert _listens_on(pid, port)
        proc.kill()  # no cleanup runs in the launcher
        proc.wait(10)
        assert _wait_gone(pid), "the router process outlived its launcher"
    finally:
        proc.kill()


@pytest.mark.slow
def test_two_router_processes_and_two_workers_on_one_gpu(ray_session, tiny_llama):
    """1P + 1D at gpus_per_worker 0.5 (one logical GPU for both) behind 2 router processes on a port picked
    once (port 0): the child listens on that port, serves alone once the in-process router stops, and is
    gone after shutdown."""
    import ray

    config = ClusterConfig(model=str(tiny_llama), prefill=1, decode=1, transport="gloo", port=0,
                           router_processes=2, gpus_per_worker=0.5, cluster_name="router-procs",
                           engine=EngineOptions(num_kv_blocks=64, max_num_seqs=8))
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = LLM(str(tiny_llama), num_kv_blocks=64).generate("Two routers", params)[0].token_ids
    harness = ClusterHarness(config)
    try:
        cluster = harness.cluster
        (child,) = cluster.router_processes
        port = cluster.router.port
        assert port != 0 and child.port == port and _listens_on(child.pid, port)
        gpu_ids = [ray.get(w.__ray_call__.remote(lambda _: ray.get_gpu_ids())) for w in cluster.workers]
        assert len(gpu_ids[0]) == 1 and gpu_ids[0] == gpu_ids[1]  # both workers on one (logical) GPU

        with Client(harness.address, timeout=60) as client:
            assert client.generate("Two routers", max_tokens=10, temperature=0, ignore_eos=True).token_ids == expected
        harness.run(cluster.router.stop(grace=1.0))  # only the child listens now
        with Client(harness.address, timeout=60) as client:
            results = [client.generate("Two routers", max_tokens=10, temperature=0, ignore_eos=True)
                       for _ in range(3)]
        assert all(r.token_ids == expected for r in results)
        harness.wait_all_blocks_free()
    finally:
        harness.close()
    assert _wait_gone(child.pid), "the router process outlived the cluster"
