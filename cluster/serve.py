"""Run a cluster until told to stop (`cluster.stop_signals`): `pdserve up` and the Ray job entrypoint.

    python -m cluster.serve --config deploy/examples/cpu.yaml
    ray job submit --working-dir . --runtime-env deploy/ray/runtime-env.yaml -- \
        python -m cluster.serve --config deploy/examples/cpu.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING

from cluster import env, stop_signals

if TYPE_CHECKING:  # imported where used: `python -m cluster.serve` in a Python without the dependencies says
    from cluster.cluster_config import ClusterConfig  # so in one line (cluster.cli), not in a traceback

METRICS_DIR_ENV = env.PROMETHEUS_MULTIPROC_DIR


def add_up_args(parser: argparse.ArgumentParser) -> None:
    """`pdserve up`'s flags. Each defaults to None ("what --config says, else ClusterConfig's default"), so the
    help text names ClusterConfig's defaults itself."""
    from cluster.cluster_config import TRANSPORTS, ClusterConfig
    from router.config import MODES, POLICIES

    d = ClusterConfig()
    parser.add_argument("--config", help="cluster YAML (see deploy/examples/); flags below override it")
    parser.add_argument("--model", help="model directory (default: the built-in tiny model, made on first use "
                        "under $PDSERVE_HOME, default ~/.cache/pdserve)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help=f"(default: {d.device})")
    parser.add_argument("--mode", choices=MODES, help="prefill + decode pools (disaggregated) or workers that do "
                        f"both in one engine (colocated) (default: {d.mode})")
    parser.add_argument("--prefill", type=int, help=f"prefill workers (default: {d.prefill})")
    parser.add_argument("--decode", type=int, help=f"decode workers (default: {d.decode})")
    parser.add_argument("--colocated", type=int, help="colocated workers (with --mode colocated; default: prefill "
                        "+ decode, the same GPUs)")
    parser.add_argument("--transport", choices=TRANSPORTS, help=f"KV transport (default: {d.transport}: gloo on "
                        "CPU; on GPUs cuda_ipc within one node, else nccl)")
    parser.add_argument("--host", help=f"address to bind and advertise (default: {d.host})")
    parser.add_argument("--port", type=int, help=f"router port, 0 picks a free one (default: {d.port})")
    parser.add_argument("--http-port", type=int, help="OpenAI-compatible HTTP API and /metrics, 0 picks a free one "
                        f"(default: {d.http_port})")
    parser.add_argument("--redis-url", help="existing Redis (default: start a private redis-server)")
    parser.add_argument("--policy", choices=POLICIES,
                        help=f"prompt placement (default: {d.policy})")
    parser.add_argument("--router-processes", type=int, help="router processes serving the port (SO_REUSEPORT; "
                        "default: a quarter of this host's cores, 1 to 4)")
    parser.add_argument("--gpus-per-worker", type=float, help="GPU share of each worker, in (0, 1]; 0.5 runs 1 "
                        f"prefill + 1 decode on one GPU, each with half its memory (default: {d.gpus_per_worker:g})")
    parser.add_argument("--api-key", action="append", default=[], help="a key clients must send (authorization: "
                        "Bearer KEY); repeatable; default: PDSERVE_API_KEY; none: the public port is open")
    parser.add_argument("--api-key-file", help="a file of API keys, one a line")
    parser.add_argument("--tls-cert", help="PEM certificate chain: TLS on the public gRPC and HTTP ports")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", help="PEM CA: mutual TLS, clients need a certificate it signed")


def config_from_args(args: argparse.Namespace) -> ClusterConfig:
    from cluster.cluster_config import ClusterConfig
    from router.auth import load_api_keys

    base = ClusterConfig.from_yaml(args.config) if args.config else ClusterConfig()
    return base.replace(model=args.model, device=args.device, mode=args.mode, prefill=args.prefill,
                        decode=args.decode, colocated=args.colocated, transport=args.transport, host=args.host,
                        port=args.port, http_port=args.http_port, redis_url=args.redis_url, policy=args.policy,
                        router_processes=args.router_processes, gpus_per_worker=args.gpus_per_worker,
                        api_keys=load_api_keys(args.api_key, args.api_key_file) or None, tls_cert=args.tls_cert,
                        tls_key=args.tls_key, tls_client_ca=args.tls_client_ca)


def multiprocess_metrics(config: ClusterConfig) -> str | None:
    """With several router processes, /metrics must sum them all: prometheus_client's multiprocess mode, in a
    fresh directory, set before prometheus_client is first imported (it reads the variable at import). Returns
    the directory this call made (to remove at the end), None if there is nothing to do or the user set one."""
    if config.num_router_processes() < 2 or METRICS_DIR_ENV in os.environ:
        return None
    if "prometheus_client" in sys.modules:
        raise RuntimeError(f"set {METRICS_DIR_ENV} before prometheus_client is imported to run several routers")
    os.environ[METRICS_DIR_ENV] = tempfile.mkdtemp(prefix="pdserve-metrics-")
    return os.environ[METRICS_DIR_ENV]


async def serve_until_stopped(config: ClusterConfig) -> None:
    """Start the cluster, serve until a stop (`cluster.stop_signals`), shut down. A stop while it starts
    cancels the start (which undoes what it began) or, if the start had already finished, shuts down at once."""
    metrics_dir = multiprocess_metrics(config)
    from cluster.launcher import Cluster

    stop = asyncio.Event()
    starting = asyncio.current_task()

    def on_stop() -> None:
        stop.set()
        if starting is not None:
            starting.cancel()

    stop_signals.install(asyncio.get_running_loop(), on_stop)
    try:
        cluster = await Cluster.start(config)
    except BaseException:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        raise
    starting = None
    try:
        how = "Ctrl-C to stop" if sys.stdin and sys.stdin.isatty() else "SIGINT, SIGTERM or SIGHUP stops it"
        print(f"pdserve: serving on {cluster.address} ({how})", flush=True)
        if cluster.http_url:
            print(f"pdserve: OpenAI API on {cluster.http_url}/v1, metrics on {cluster.http_url}/metrics", flush=True)
        await stop.wait()
    finally:
        print("pdserve: shutting down", flush=True)
        await cluster.shutdown()
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        print("pdserve: stopped", flush=True)


def run_up(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    try:
        asyncio.run(serve_until_stopped(config))
    except asyncio.CancelledError:  # stopped while starting
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m cluster.serve ARGS` is `pdserve up ARGS` (the same flags, errors and signals)."""
    from cluster.cli import main as cli_main

    return cli_main(["up", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
