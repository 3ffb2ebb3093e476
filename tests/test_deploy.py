"""deploy/: the example configs, the Ray job runtime env, the Dockerfile and the Helm chart stay consistent
with the code (ClusterConfig's schema, the package folders).

The chart is linted and rendered with real Helm where one is at hand: the `helm` binary on PATH, or the
`helm_python` package (Helm's Go SDK as a library: `pip install helm-python-sdk`); else those tests skip.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.cluster_config import ClusterConfig

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


def test_chart_security(helm: tuple[Renderer, Callable[[], list[str]]]) -> None:
    """Keys and the cluster secret come from a Secret; a NetworkPolicy admits only the router's public ports
    from outside the release."""
    docs = helm[0]({"security": {"secretName": "llm-creds"}})
    head = by_kind(docs, "Deployment")["demo-pdserve-head"]["spec"]["template"]["spec"]["containers"][0]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in head["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs["PDSERVE_API_KEY"] == {"name": "llm-creds", "key": "api-key", "optional": True}
    assert refs["PDSERVE_CLUSTER_SECRET"]["key"] == "cluster-secret"
    policies = by_kind(docs, "NetworkPolicy")
    public = policies["demo-pdserve-public"]["spec"]
    assert public["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "head"
    assert [p["port"] for p in public["ingress"][0]["ports"]] == [50051, 8000] and "from" not in public["ingress"][0]
    inside = policies["demo-pdserve"]["spec"]["ingress"][0]
    assert inside["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "demo"
    assert "PDSERVE_API_KEY" not in {e["name"] for e in by_kind(helm[0]({}), "Deployment")["demo-pdserve-head"]
                                     ["spec"]["template"]["spec"]["containers"][0]["env"]}
