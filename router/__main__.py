"""`python -m router --model DIR --redis-url redis://... [--port N]`: run the public gRPC router."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from router.config import MODES, POLICIES, RouterConfig
from router.server import serve


def parse_args(argv: list[str] | None = None) -> RouterConfig:
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
    a = p.parse_args(argv)
    return RouterConfig(model_dir=a.model, redis_url=a.redis_url, host=a.host, port=a.port,
                        http_port=None if a.http_port < 0 else a.http_port,
                        cluster_name=a.cluster_name, served_model_name=a.served_model_name, mode=a.mode,
                        policy=a.policy, max_queue=a.max_queue, max_model_len=a.max_model_len,
                        reserve_lease_ms=a.reserve_lease_ms,
                        prefill_timeout_s=a.prefill_timeout,
                        decode_first_token_timeout_s=a.decode_first_token_timeout)


async def _main(config: RouterConfig) -> None:
    router = await serve(config)
    print(f"pdserve router listening on {router.address}", flush=True)
    if router.http_port is not None:
        print(f"pdserve OpenAI API on http://{config.host}:{router.http_port}/v1", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await router.stop()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_main(parse_args(argv)))


if __name__ == "__main__":
    main()
