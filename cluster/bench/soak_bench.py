"""`pdserve bench soak`: a long mixed load on a cluster this command starts, with faults on the way.

It brings up a cluster in this process (`Cluster.start`: Ray, the launcher's supervised redis-server, the
router, the workers) and sends N requests from a client process (`soak_load`: random lengths, client
cancels, short deadlines, malformed requests) at a fixed concurrency. Optionally, once a share of them has
ended, it SIGKILLs a worker's engine process (`--kill-worker-at`; the launcher's supervisor replaces it) and
the redis-server (`--restart-redis-at`; the supervisor restarts it). Then it lets traffic settle and reports
every status count by kind (and which were unexpected), the KV blocks each worker still holds by its own
account (GetStats) and the registry's, what the router still holds, and the RSS of this process (launcher +
router) and of each worker (engine process and its gRPC front end) after the warm-up and at the end.
Exit status 1 if a request ended unexpectedly, a block leaked, or the RSS grew past `--max-rss-growth`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import Counter
from typing import Any

from cluster.bench.report import metadata, run_dir, write_json
from cluster.bench.soak_load import EXPECTED, FAULT_STATUSES, Mix, Outcome, plan, run_client
from cluster.bench.workload import parse_range

SETTLE_POLL_S = 0.2


def add_soak_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local model directory (default: the built-in tiny model)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--mode", default="disaggregated", choices=("disaggregated", "colocated"))
    p.add_argument("--prefill", type=int, default=1)
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--transport", default="auto")
    p.add_argument("--num-kv-blocks", type=int, help="KV blocks per worker (default: the engine's sizing)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--num-warmup", type=int, default=50, help="normal requests before the start RSS is taken")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--input-range", default="4,200", help="LO,HI prompt tokens")
    p.add_argument("--output-range", default="1,64", help="LO,HI output tokens")
    p.add_argument("--cancel-share", type=float, default=0.05, help="requests the client cancels mid-stream")
    p.add_argument("--deadline-share", type=float, default=0.05, help="requests with a short deadline")
    p.add_argument("--deadline-range", default="0.02,0.5", help="LO,HI seconds of the short deadlines")
    p.add_argument("--bad-share", type=float, default=0.05, help="malformed requests (INVALID_ARGUMENT expected)")
    p.add_argument("--kill-worker-at", type=float, help="SIGKILL a worker once this share of requests has ended")
    p.add_argument("--kill-role", choices=("prefill", "decode", "colocated"),
                   help="which worker --kill-worker-at kills, the first of that role (default: decode, or colocated "
                        "in colocated mode)")
    p.add_argument("--restart-redis-at", type=float,
                   help="SIGKILL the redis-server once this share has ended (the launcher starts it again)")
    p.add_argument("--fault-window", type=float, default=30.0,
                   help="seconds after a fault in which UNAVAILABLE and ABORTED are expected answers")
    p.add_argument("--settle-timeout", type=float, default=90.0,
                   help="seconds for traffic to settle and replaced workers to return before blocks are counted")
    p.add_argument("--max-rss-growth", type=float, default=0.10, help="fail above this RSS growth (0.10: 10%%)")


def rss_bytes(pid: int, children: bool) -> int:
    """Resident memory of process `pid`, with its children's (a worker's gRPC front end) if `children`; 0 if
    it is gone."""
    import psutil

    try:
        proc = psutil.Process(pid)
        kids = proc.children(recursive=True) if children else []
        return proc.memory_info().rss + sum(c.memory_info().rss for c in kids)
    except psutil.Error:
        return 0


def rss_snapshot(cluster: Any) -> dict[str, Any]:
    """RSS (bytes) of this process (launcher + router; Ray's own processes are its children, not counted) and
    of each worker (engine process + gRPC front end), by worker id (with its pid)."""
    return {"router": rss_bytes(os.getpid(), children=False),
            "workers": {w["worker_id"]: {"pid": int(w["pid"]), "rss": rss_bytes(int(w["pid"]), children=True)}
                        for w in cluster.worker_info}}


def rss_growth(start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
    """Growth end/start - 1 of the router and of each worker whose engine process is the same at both ends
    (a replaced worker is a new process: its growth is not comparable, so it is None)."""
    out: dict[str, Any] = {"router": end["router"] / start["router"] - 1 if start["router"] else None, "workers": {}}
    for wid, s in start["workers"].items():
        e = end["workers"].get(wid)
        same = e is not None and e["pid"] == s["pid"] and s["rss"] and e["rss"]
        out["workers"][wid] = e["rss"] / s["rss"] - 1 if same else None
    return out


def worker_blocks(cluster: Any) -> list[dict[str, Any]]:
    """Each worker's own account (GetStats), with `leaked` = blocks not free; unreachable workers say so."""
    import grpc
    from pdserve.v1 import worker_pb2 as wpb
    from pdserve.v1 import worker_pb2_grpc as wpb_grpc

    from cluster.grpc_auth import worker_channel

    rows = []
    for w in cluster.worker_info:
        with worker_channel(w["address"], cluster.secret) as channel:
            try:
                s = wpb_grpc.WorkerServiceStub(channel).GetStats(wpb.StatsRequest(), timeout=5)
            except grpc.RpcError as err:
                rows.append({"worker_id": w["worker_id"], "error": f"{err.code().name}: {err.details()}"})
                continue
        rows.append({"worker_id": s.worker_id, "role": s.role, "total": s.total_kv_blocks, "free": s.free_kv_blocks,
                     "reserved": s.reserved_kv_blocks, "running": s.num_running, "waiting": s.num_waiting,
                     "leaked": s.total_kv_blocks - s.free_kv_blocks + s.reserved_kv_blocks})
    return rows


def settled(rows: list[dict[str, Any]]) -> bool:
    return all("error" not in r and r["leaked"] == 0 and r["running"] == 0 and r["waiting"] == 0 for r in rows)


async def _settle(cluster: Any, timeout_s: float) -> tuple[list[dict[str, Any]], float]:
    """Poll the workers until none holds a block or a request (replaced ones back), or `timeout_s` passes."""
    t0 = time.monotonic()
    while True:
        rows = await asyncio.to_thread(worker_blocks, cluster)
        if settled(rows) or time.monotonic() - t0 > timeout_s:
            return rows, time.monotonic() - t0
        await asyncio.sleep(SETTLE_POLL_S)


def registry_view(cluster: Any) -> list[dict[str, Any]]:
    """What the registry holds per worker: its heartbeat's free blocks and the routers' outstanding picks."""
    from cluster.registry import Registry

    reg = Registry(cluster.redis_url, cluster.config.cluster_name, secret=cluster.secret)
    try:
        return [{"worker_id": info.worker_id, "free": load.free_kv_blocks, "total": info.total_kv_blocks,
                 "outstanding": reg.outstanding_blocks(info.worker_id)} for info, load in reg.list_workers()]
    finally:
        reg.close()


def _fault(cluster: Any, what: str, role: str) -> dict[str, Any]:
    """SIGKILL the first `role` worker's engine process, or the redis-server; what was done, and when."""
    if what == "worker":
        w = next((w for w in cluster.worker_info if w["role"] == role), None)
        if w is None:
            raise ValueError(f"--kill-role {role}: the cluster has no {role} worker")
        os.kill(int(w["pid"]), signal.SIGKILL)
        return {"fault": "worker killed", "worker_id": w["worker_id"], "pid": int(w["pid"]), "t": time.monotonic()}
    if cluster.redis is None or cluster.redis.pid is None:
        raise ValueError("--restart-redis-at needs the launcher's own redis-server")
    pid = cluster.redis.pid
    os.kill(pid, signal.SIGKILL)
    return {"fault": "redis-server killed", "pid": pid, "t": time.monotonic()}


async def _drive(cluster: Any, args: argparse.Namespace, specs: list[Any], warmup: list[Any],
                 info: tuple[int, int]) -> dict[str, Any]:
    """Run the client process; take the start RSS after its warm-up, inject the faults on the way."""
    faults_due = sorted((share, what) for share, what in ((args.kill_worker_at, "worker"),
                                                          (args.restart_redis_at, "redis")) if share is not None)
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(
        target=run_client, args=(cluster.address, warmup, specs, args.concurrency, *info, child), daemon=True)
    proc.start()
    rss_start: dict[str, Any] | None = None
    faults, outcomes, t_load = [], None, None
    while outcomes is None:
        if not await asyncio.to_thread(parent.poll, 0.1):
            if not proc.is_alive():
                raise RuntimeError(f"the soak client process exited ({proc.exitcode}) before reporting")
            continue
        kind, *payload = parent.recv()
        if kind == "warm":
            rss_start, t_load = rss_snapshot(cluster), time.monotonic()
        elif kind == "progress" and rss_start is not None:
            while faults_due and payload[0] >= faults_due[0][0] * len(specs):
                _, what = faults_due.pop(0)
                faults.append({**_fault(cluster, what, args.kill_role), "after_requests": payload[0]})
        elif kind == "outcomes":
            outcomes = payload[0]
    proc.join(timeout=10)
    assert rss_start is not None and t_load is not None
    return {"rss_start": rss_start, "outcomes": outcomes, "faults": faults, "t_load": t_load,
            "load_s": time.monotonic() - t_load}


def summarize(outcomes: list[Outcome], fault_times: list[float], window_s: float) -> dict[str, Any]:
    """Status counts overall and by kind, and the unexpected outcomes (at most 20 listed): a status outside
    its kind's EXPECTED, unless a fault's (FAULT_STATUSES) within `window_s` after a fault."""
    by_kind: dict[str, Counter[str]] = {}
    unexpected = []
    for index, kind, status, detail, t_end in outcomes:
        by_kind.setdefault(kind, Counter())[status] += 1
        after_fault = any(0 <= t_end - t <= window_s for t in fault_times)
        if status not in EXPECTED[kind] and not (kind != "bad" and status in FAULT_STATUSES and after_fault):
            unexpected.append({"index": index, "kind": kind, "status": status, "detail": detail})
    total = Counter(o[2] for o in outcomes)
    return {"statuses": dict(total.most_common()), "by_kind": {k: dict(c.most_common()) for k, c in by_kind.items()},
            "num_unexpected": len(unexpected), "unexpected": unexpected[:20]}


async def _soak(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.cluster_config import ClusterConfig, EngineOptions
    from cluster.launcher import Cluster

    engine = EngineOptions(num_kv_blocks=args.num_kv_blocks, max_model_len=args.max_model_len)
    mode = args.mode
    config = ClusterConfig(model=args.model, device=args.device, mode=mode, prefill=args.prefill, decode=args.decode,
                           transport=args.transport, port=0, http_port=None, cluster_name="soak", engine=engine,
                           router_processes=1)
    lo, hi = (float(x) for x in args.deadline_range.split(","))
    mix = Mix(parse_range(args.input_range), parse_range(args.output_range), args.cancel_share, args.deadline_share,
              args.bad_share, (lo, hi))
    cluster = await Cluster.start(config, progress=False)
    try:
        model = cluster.router.orchestrator.model
        info = (model.vocab_size, model.max_model_len)
        specs = plan(args.num_requests, mix, *info, seed=args.seed)
        warmup = plan(args.num_warmup, dataclasses.replace(mix, cancel_share=0, deadline_share=0, bad_share=0), *info,
                      seed=args.seed + 1)
        run = await _drive(cluster, args, specs, warmup, info)
        blocks, settle_s = await _settle(cluster, args.settle_timeout)
        orch = cluster.router.orchestrator
        router_holds = {"inflight_ids": orch.num_inflight, "admitted": orch.admission.admitted,
                        "waiting": orch.admission.num_waiting}
        registry = await asyncio.to_thread(registry_view, cluster)
        rss_end = rss_snapshot(cluster)
        supervisors = {"workers_replaced": cluster.worker_supervisor.replaced if cluster.worker_supervisor else 0,
                       "redis_restarts": cluster.supervisor.restarts if cluster.supervisor else 0}
    finally:
        await cluster.shutdown()
    growth = rss_growth(run["rss_start"], rss_end)
    summary = summarize(run["outcomes"], [f["t"] for f in run["faults"]], args.fault_window)
    for f in run["faults"]:
        f["t"] = round(f["t"] - run["t_load"], 3)  # seconds into the load
    return {"cluster": {"prefill": args.prefill, "decode": args.decode, "transport": cluster.transport,
                        "mode": mode, "max_model_len": info[1]},
            "model_dir": cluster.model_dir,
            "workload": {"num_requests": len(specs), "concurrency": args.concurrency, **dataclasses.asdict(mix)},
            "load_s": run["load_s"], "faults": run["faults"], **supervisors, **summary,
            "settle_s": settle_s, "worker_blocks": blocks, "registry": registry, "router_holds": router_holds,
            "leaked_blocks": sum(r.get("leaked", 0) for r in blocks),
            "rss_start": run["rss_start"], "rss_end": rss_end, "rss_growth": growth}


def problems(result: dict[str, Any], max_growth: float) -> list[str]:
    """Why the soak failed (empty: it passed)."""
    out = []
    if result["num_unexpected"]:
        out.append(f"{result['num_unexpected']} requests ended unexpectedly")
    if result["leaked_blocks"] or not settled(result["worker_blocks"]):
        out.append(f"workers still hold KV blocks or requests: {result['worker_blocks']}")
    if any(r["outstanding"] for r in result["registry"]):
        out.append(f"the registry still counts blocks picked by routers: {result['registry']}")
    if any(result["router_holds"].values()):
        out.append(f"the router still holds requests: {result['router_holds']}")
    growths = [result["rss_growth"]["router"], *result["rss_growth"]["workers"].values()]
    if any(g is not None and g > max_growth for g in growths):
        out.append(f"RSS grew more than {max_growth:.0%}: {result['rss_growth']}")
    return out


def run_soak_bench(args: argparse.Namespace) -> int:
    """Run the soak described by `args`; exit status 1 if it found a problem."""
    if args.num_requests < 1 or args.concurrency < 1:
        raise ValueError("--num-requests and --concurrency must be >= 1")
    for name in ("kill_worker_at", "restart_redis_at"):
        share = getattr(args, name)
        if share is not None and not 0 <= share < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {share}")
    if args.kill_role is None:
        args.kill_role = "colocated" if args.mode == "colocated" else "decode"
    result = asyncio.run(_soak(args))
    result["problems"] = problems(result, args.max_rss_growth)
    folder = run_dir(args.out, "soak")
    write_json(folder / "result.json", {**metadata("soak", args, args.device, result["model_dir"]), **result})
    mb = 2**20
    print(f"soak: {result['workload']['num_requests']} requests in {result['load_s']:.1f}s, faults "
          f"{[f['fault'] for f in result['faults']] or 'none'}; statuses {result['statuses']}")
    print(f"  unexpected {result['num_unexpected']}, leaked blocks {result['leaked_blocks']} (settled in "
          f"{result['settle_s']:.1f}s), router RSS {result['rss_start']['router'] / mb:.0f} -> "
          f"{result['rss_end']['router'] / mb:.0f} MiB")
    for p in result["problems"]:
        print(f"  PROBLEM: {p}", file=sys.stderr)
    print(f"wrote {folder}")
    return 1 if result["problems"] else 0
