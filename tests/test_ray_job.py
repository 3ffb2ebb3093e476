"""The cluster as a Ray job, the way a user runs it on an existing Ray cluster (all real, all local):

    ray start --head ...  →  ray job submit --working-dir <repo> --runtime-env deploy/ray/runtime-env.yaml
    -- python -m cluster.serve --config deploy/examples/cpu.yaml --host 0.0.0.0 (as the Helm chart runs it)
    →  wait for "pdserve: serving on HOST:PORT" in `ray job logs`  →  generate through the SDK
    →  `ray job stop` (graceful: the driver drains and stops its workers and redis-server)  →  stop the head.

Isolation on a shared machine: the head gets free ports and its own --temp-dir (so its address file does
not replace /tmp/ray/ray_current_cluster, which other `ray.init()` calls read). It is stopped by SIGTERM to
its own `ray start --block` process, which kills the processes of that node only; `ray stop` is not used
because it kills every Ray process on the host, other people's included. Every process the test starts
carries a marker variable in its environment, so leftovers are found (and killed, in the fixture's
finally) by pid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]

REPO = Path(__file__).resolve().parents[1]
RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
MARKER = "PDSERVE_RAY_JOB_TEST"
SERVING = re.compile(r"pdserve: serving on (\S+:\d+)")
TERMINAL = ("STOPPED", "SUCCEEDED", "FAILED")
PROMPT = "A Ray job serves this prompt"
RUNTIME_ENV = REPO / "deploy" / "ray" / "runtime-env.yaml"
SHIPPED = {"cluster", "router", "prefill_worker", "decode_worker", "proto", "deploy", "pyproject.toml"}


@dataclass
class RayHead:
    proc: subprocess.Popen[bytes]
    temp_dir: Path
    dashboard: str  # http://127.0.0.1:PORT, the job submission address
    env: dict[str, str]
    marker: str
    tracked: dict[int, str] = field(default_factory=dict)  # unmarked processes to check and clean up too

    def ray(self, *args: str, timeout: float = 90) -> str:
        """Run the `ray` CLI against this head; its stdout+stderr (raises on a non-zero exit)."""
        done = subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        out = done.stdout + done.stderr
        if done.returncode != 0:
            raise AssertionError(f"`ray {' '.join(args)}` exited {done.returncode}:\n{out[-4000:]}")
        return out

    def job(self, command: str, job_id: str, timeout: float = 90) -> str:
        return self.ray("job", command, "--address", self.dashboard, job_id, timeout=timeout)

    def job_info(self, job_id: str) -> dict[str, Any]:
        """The job's record from the Jobs REST API (`ray job status` prints it in prose that varies)."""
        with urllib.request.urlopen(f"{self.dashboard}/api/jobs/{job_id}", timeout=10) as reply:
            return dict(json.load(reply))

    def job_status(self, job_id: str) -> str:
        return str(self.job_info(job_id)["status"])


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def marked_processes(marker: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment carries MARKER=marker."""
    needle = f"{MARKER}={marker}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found[int(entry)] = cmd.strip()
        except OSError:  # gone, or not ours to read
            continue
    return found


def _alive(pid: int) -> bool:
    try:  # the state follows the parenthesised command name; Z: a zombie, as good as gone
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def children(pids: set[int]) -> dict[int, str]:
    """pid -> command line of the live direct children of `pids`."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[1]) in pids:
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, ValueError, IndexError):
            continue
    return found


def job_processes(marker: str) -> dict[int, str]:
    """The job's driver, its worker actors, and the driver's children: its redis-server, whose process title
    overwrites its environment, so the marker cannot find it."""
    marked = marked_processes(marker)
    found = {p: c for p, c in marked.items() if re.search(r"cluster\.serve|WorkerActor", c)}
    return found | children({p for p, c in found.items() if "cluster.serve" in c})


def wait_gone(marker: str, pattern: str, timeout_s: float, also: dict[int, str] | None = None) -> dict[int, str]:
    """Poll until no marked process's command line matches `pattern` and none of `also` lives; the survivors."""
    end = time.monotonic() + timeout_s
    while True:
        left = {p: c for p, c in marked_processes(marker).items() if re.search(pattern, c) and _alive(p)}
        left |= {p: c for p, c in (also or {}).items() if _alive(p)}
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.5)


def _dashboard_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def stop_head(head: RayHead, timeout_s: float = 60) -> dict[int, str]:
    """SIGTERM the `ray start --block` process (it kills its node's processes); SIGKILL and return leftovers."""
    if head.proc.poll() is None:
        head.proc.send_signal(signal.SIGTERM)
        try:
            head.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            head.proc.kill()
            head.proc.wait(10)
    left = wait_gone(head.marker, ".", timeout_s=15, also=head.tracked)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
    return left


@pytest.fixture
def ray_head() -> Iterator[RayHead]:
    if RAY is None:
        pytest.skip("the `ray` CLI is not installed")
    temp_dir = Path(tempfile.mkdtemp(prefix="pdrj-"))  # short: Ray puts unix sockets under it
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update({
        MARKER: marker,
        # A ~/.ray/auth_token left by any earlier ray.init() makes `ray start` turn token auth on, and the
        # job driver's ray.init(address=...) would then need the token: keep this head's mode explicit.
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
        # the job's `python` (and the workers') must be this interpreter, with pdserve installed
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    gcs, dash, client, agent_http, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr = _free_ports(9)
    cmd = [RAY, "start", "--head", "--block", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
           "--metrics-export-port", str(metrics), "--node-manager-port", str(node_mgr),
           "--object-manager-port", str(obj_mgr), "--num-cpus", "4", "--num-gpus", "2",
           "--disable-usage-stats", "--temp-dir", str(temp_dir / "ray")]
    with open(temp_dir / "head.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=temp_dir, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(proc, temp_dir, f"http://127.0.0.1:{dash}", env, marker)
    try:
        end = time.monotonic() + 120
        while not _dashboard_up(head.dashboard):
            if proc.poll() is not None or time.monotonic() > end:
                out = (temp_dir / "head.log").read_text(errors="replace")[-4000:]
                raise AssertionError(f"ray head did not come up (exit {proc.poll()}):\n{out}")
            time.sleep(1)
        yield head
    finally:
        stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_serving(head: RayHead, job_id: str, timeout_s: float = 300) -> str:
    """Poll `ray job logs` for the serving line; its HOST:PORT. Fails early if the job ends."""
    end = time.monotonic() + timeout_s
    while True:
        logs = head.job("logs", job_id)
        if found := SERVING.search(logs):
            return found.group(1)
        info = head.job_info(job_id)
        if info["status"] in TERMINAL or time.monotonic() > end:
            raise AssertionError(f"job {job_id} is {info['status']} ({info.get('message')}), not serving; "
                                 f"its log:\n{logs[-6000:]}")
        time.sleep(2)


def offline_tokens(model_dir: Path, max_tokens: int) -> list[int]:
    from cluster.engine import LLM, SamplingParams

    llm = LLM(str(model_dir), num_kv_blocks=64)
    return llm.generate(PROMPT, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))[0].token_ids


@pytest.mark.timeout(540)
def test_cluster_runs_as_a_ray_job(ray_head: RayHead) -> None:
    from pdserve import Client

    t0 = time.monotonic()
    job_id = f"pdserve-test-{ray_head.marker[:8]}"
    home = ray_head.temp_dir / "pdserve-home"  # the built-in model is made here, by the job
    # The shipped runtime env (upload only the code; time to drain on stop), plus a private model cache.
    runtime_env = yaml.safe_load(RUNTIME_ENV.read_text())
    runtime_env["env_vars"]["PDSERVE_HOME"] = str(home)
    # host 0.0.0.0 as in the Helm chart: the router listens on all interfaces and each worker advertises
    # the IP of its Ray node.
    ray_head.ray("job", "submit", "--address", ray_head.dashboard, "--submission-id", job_id,
                 "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--no-wait",
                 "--", "python", "-m", "cluster.serve", "--config", "deploy/examples/cpu.yaml", "--port", "0",
                 "--http-port", "0", "--host", "0.0.0.0")

    address = "127.0.0.1:" + wait_for_serving(ray_head, job_id).rsplit(":", 1)[1]
    t_serving = time.monotonic() - t0
    uploaded = list((ray_head.temp_dir / "ray" / "session_latest" / "runtime_resources" / "working_dir_files").glob(
        "*/cluster/serve.py"))
    assert len(uploaded) == 1, "the job did not run from the uploaded working dir"
    shipped = {p.name for p in uploaded[0].parents[1].iterdir()}
    assert shipped <= SHIPPED and {"cluster", "router", "proto"} <= shipped, shipped
    worker_logs = "".join(f.read_text(errors="replace") for f in
                          (ray_head.temp_dir / "ray" / "session_latest" / "logs").glob("worker-*.err"))
    advertised = re.findall(r"\((?:prefill|decode)\) serving on (\S+)", worker_logs)
    assert len(advertised) == 2 and not any(a.startswith("0.0.0.0:") for a in advertised), (
        f"expected each worker to log '(ROLE) serving on NODE_IP:PORT', found {advertised}")

    ray_head.tracked = job_processes(ray_head.marker)
    assert sum("WorkerActor" in c for c in ray_head.tracked.values()) == 2, ray_head.tracked
    assert any("redis-server" in c for c in ray_head.tracked.values()), ray_head.tracked

    with Client(address, timeout=60) as client:
        client.wait_until_serving(timeout=60)
        first = client.generate(PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
        second = client.generate(PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
    assert len(first.token_ids) == 8 and first.finish_reason == "length"
    assert first.token_ids == second.token_ids
    assert first.prefill_worker.startswith("prefill-") and first.decode_worker.startswith("decode-")
    assert first.token_ids == offline_tokens(home / "models" / "tiny-llama", 8)  # same as one engine

    ray_head.job("stop", job_id, timeout=120)  # returns once the job is no longer running
    assert ray_head.job_status(job_id) == "STOPPED"
    assert "pdserve: stopped" in ray_head.job("logs", job_id), "the driver was killed before it shut down"
    left = wait_gone(ray_head.marker, r"cluster\.serve|WorkerActor", timeout_s=30, also=ray_head.tracked)
    assert not left, f"the stopped job left processes behind: {left}"
    with socket.socket() as s:
        host, port = address.rsplit(":", 1)
        assert s.connect_ex((host, int(port))) != 0, "the router port is still open"

    left = stop_head(ray_head)
    assert ray_head.proc.returncode is not None and not left, f"survived the head's shutdown: {left}"
    print(f"ray job: serving after {t_serving:.0f}s, whole test {time.monotonic() - t0:.0f}s")
