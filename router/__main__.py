"""`python -m router --model DIR --redis-url redis://... [--port N] [--processes N]`: run the public gRPC router
(with `--processes` N > 1: this process and N - 1 children, one port, SO_REUSEPORT)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal

from router.config import MODES, POLICIES, RouterConfig
from router.process import RouterProcess, check_port_free
from router.server import serve


def parse_args(argv: list[str] | None = None) -> tuple[RouterConfig, int]:
    p = argparse.ArgumentParser(prog="python -m router", description=__doc__)
    p.add_argument("--model", required=True, help="model directory (tokenizer.json, config.json)")
    p.add_argument("--redis-url", required=True, help="worker registry, e.g. redis://127.0.0.1:6379/0")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port (printed at start)")
    p.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible HTTP API and /metrics; 0 picks a "
                   "free port (printed at start), -1: none")
    p.add_argument("--cluster-name", default="default")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--mode", choices=MODES, default="disaggregated",
                   help="serve with prefill + decode workers, or with colocated workers")
    p.add_argument("--policy", choices=POLICIES, default="least_loaded")
    p.add_argument("--max-queue", type=int, default=1024, help="requests in flight before RESOURCE_EXHAUSTED")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--reserve-lease-ms", type=int, default=60_000)
    p.add_argument("--prefill-timeout", type=float, default=60.0, help="seconds")
    p.add_argument("--decode-first-token-timeout", type=float, default=60.0, help="seconds")
    p.add_argument("--stream-idle-timeout", type=float, default=60.0,
                   help="seconds a client may leave its stream unread before the router cancels it")
    p.add_argument("--processes", type=int, default=1, help="router processes serving the port (SO_REUSEPORT)")
    a = p.parse_args(argv)
    if a.processes < 1:
        p.error(f"--processes must be >= 1, got {a.processes}")
    return RouterConfig(model_dir=a.model, redis_url=a.redis_url, host=a.host, port=a.port,
                        reuse_port=a.processes > 1,
                        http_port=None if a.http_port < 0 else a.http_port,
                        cluster_name=a.cluster_name, served_model_name=a.served_model_name, mode=a.mode,
                        policy=a.policy, max_queue=a.max_queue, max_model_len=a.max_model_len,
                        reserve_lease_ms=a.reserve_lease_ms,
                        prefill_timeout_s=a.prefill_timeout,
                        decode_first_token_timeout_s=a.decode_first_token_timeout,
                        stream_idle_timeout_s=a.stream_idle_timeout), a.processes


async def _main(config: RouterConfig, processes: int) -> None:
    if processes > 1:
        check_port_free(config.host, config.port)
    router = await serve(config)
    child = dataclasses.replace(config, port=router.port, http_port=router.http_port)
    children = [RouterProcess(child) for _ in range(processes - 1)]
    try:
        await asyncio.gather(*(c.wait_ready() for c in children))
        print(f"pdserve router listening on {router.address} ({processes} processes)", flush=True)
        if router.http_port is not None:
            print(f"pdserve OpenAI API on http://{config.host}:{router.http_port}/v1", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await asyncio.gather(router.stop(), *(c.stop() for c in children))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_main(*parse_args(argv)))


if __name__ == "__main__":
    main()
