"""Run a cluster until told to stop: `pdserve up` and the Ray job entrypoint.

    python -m cluster.serve --config deploy/examples/cpu.yaml
    ray job submit --working-dir . --runtime-env deploy/ray/runtime-env.yaml -- \
        python -m cluster.serve --config deploy/examples/cpu.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from cluster.cluster_config import MODES, TRANSPORTS, ClusterConfig


def add_up_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="cluster YAML (see deploy/examples/); flags below override it")
    parser.add_argument("--model", help="model directory (default: the built-in tiny model)")
    parser.add_argument("--device", choices=("cpu", "cuda"))
    parser.add_argument("--mode", choices=MODES, help="prefill + decode pools (disaggregated, the default) or "
                        "workers that do both in one engine (colocated)")
    parser.add_argument("--prefill", type=int, help="prefill workers")
    parser.add_argument("--decode", type=int, help="decode workers")
    parser.add_argument("--colocated", type=int, help="colocated workers (with --mode colocated; default: prefill "
                        "+ decode, the same GPUs)")
    parser.add_argument("--transport", choices=TRANSPORTS)
    parser.add_argument("--host", help="address to bind and advertise")
    parser.add_argument("--port", type=int, help="router port (0: pick a free one)")
    parser.add_argument("--http-port", type=int, help="OpenAI-compatible HTTP API and /metrics (default 8000; 0: "
                        "pick a free one)")
    parser.add_argument("--redis-url", help="existing Redis (default: start a private redis-server)")
    parser.add_argument("--policy", choices=("round_robin", "least_loaded", "prefix_aware"))


def config_from_args(args: argparse.Namespace) -> ClusterConfig:
    base = ClusterConfig.from_yaml(args.config) if args.config else ClusterConfig()
    return base.replace(model=args.model, device=args.device, mode=args.mode, prefill=args.prefill,
                        decode=args.decode, colocated=args.colocated, transport=args.transport, host=args.host,
                        port=args.port, http_port=args.http_port, redis_url=args.redis_url, policy=args.policy)


async def serve_until_stopped(config: ClusterConfig) -> None:
    from cluster.launcher import Cluster

    cluster = await Cluster.start(config)
    print(f"pdserve: serving on {cluster.address} (Ctrl-C to stop)", flush=True)
    if cluster.http_url:
        print(f"pdserve: OpenAI API on {cluster.http_url}/v1, metrics on {cluster.http_url}/metrics", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        print("pdserve: shutting down", flush=True)
        await cluster.shutdown()
        print("pdserve: stopped", flush=True)


def run_up(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve_until_stopped(config_from_args(args)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_up_args(parser)
    return run_up(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
