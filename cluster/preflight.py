"""Checks that run before Ray and Redis start, so a user mistake costs a second and one line, not a minute
and a remote traceback: the model directory (config.json and tokenizer files readable and consistent), the
device (for a private Ray on this machine; a Ray cluster's driver may have no GPU), the ports; and once Ray is
up, that it offers the resources the workers ask. Each failure is a `ValueError` naming the file, key or flag
and what to do."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from cluster.cluster_config import ClusterConfig
from router.process import check_port_free

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")  # as engine.model_spec
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings")


def check(config: ClusterConfig) -> None:
    """Everything about `config` that can be known without starting anything."""
    if config.model is not None:
        check_model_dir(config.model)
    if not (config.ray_address or os.environ.get("RAY_ADDRESS")):  # a Ray cluster's GPUs: check_ray_fits
        check_device(config.device)  # the workers run here, in a private Ray
    check_port_free_for("--port / port:", config.host, config.port)
    if config.http_port is not None:
        check_port_free_for("--http-port / http_port:", config.host, config.http_port)


def read_json(path: Path) -> Any:
    """A JSON file's contents; ValueError naming the file and the line otherwise."""
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(f"{path}: not valid JSON{where} (truncated or edited?): {e}") from None


def check_model_dir(model: str) -> None:
    """`model` is a directory with a config.json pdserve can build and a tokenizer.json it can read."""
    path = Path(model)
    hint = "give a Hugging Face model directory (or leave --model out for the built-in model)"
    if not path.exists():
        raise ValueError(f"--model {model}: no such directory; {hint}")
    if not path.is_dir():
        raise ValueError(f"--model {model} is a file, not a directory; {hint}")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"--model {model}: no config.json there; {hint}")
    check_model_config(read_json(cfg_path), cfg_path)
    tok_path = path / "tokenizer.json"
    if not tok_path.is_file():
        raise ValueError(f"--model {model}: no tokenizer.json there (pdserve needs a fast tokenizer file)")
    read_json(tok_path)
    if (path / "tokenizer_config.json").is_file():
        read_json(path / "tokenizer_config.json")


def check_model_config(cfg: Any, path: Path) -> None:
    """The shape facts the engine relies on: a supported architecture, positive sizes, heads that divide."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    archs = cfg.get("architectures") or []
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: `architectures` is {archs!r}; pdserve serves {', '.join(SUPPORTED_ARCHITECTURES)}")
    for key in (*_POSITIVE_INTS, "num_key_value_heads", "head_dim"):
        value = cfg.get(key)
        if value is None and key not in _POSITIVE_INTS:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{path}: `{key}` must be a positive integer, got {value!r}")
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    if cfg.get("head_dim") is None and hidden % heads:
        raise ValueError(f"{path}: `hidden_size` {hidden} is not a multiple of `num_attention_heads` {heads} "
                         "(and no `head_dim` is given)")
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ValueError(f"{path}: `num_attention_heads` {heads} is not a multiple of `num_key_value_heads` "
                         f"{kv_heads}")


def check_device(device: str) -> None:
    """`cuda` needs a GPU that this torch build can use; look for the driver's device files before importing
    torch (which takes seconds), then ask torch."""
    if device != "cuda":
        return
    if not list(Path("/dev").glob("nvidia[0-9]*")):
        raise ValueError("--device cuda / device: cuda: no NVIDIA GPU on this machine; use --device cpu")
    import torch

    if not torch.cuda.is_available():
        build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"--device cuda / device: cuda: torch {torch.__version__} ({build}) sees no GPU; install "
                         "the CUDA build of torch matching the driver, or use --device cpu")


def check_port_free_for(flag: str, host: str, port: int) -> None:
    """ValueError naming `flag` if something already listens on host:port."""
    try:
        check_port_free(host, port)
    except RuntimeError as e:
        raise ValueError(f"{flag} {port}: {e}; stop what holds it (another pdserve up?) or pick another port "
                         "(0 picks a free one)") from None


def check_ray_fits(config: ClusterConfig, resources: dict[str, float]) -> None:
    """The Ray cluster offers, in total (`ray.cluster_resources()`), what the workers' placement group asks:
    else waiting for it would only time out. ValueError with the `ray start` flag that fixes it."""
    n = len(config.worker_roles())
    gpus, cpus = n * config.gpus_per_worker, n * config.cpus_per_worker
    have_gpus, have_cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    if have_gpus + 1e-9 < gpus:
        hint = (f"on a CPU machine give Ray logical GPUs: `ray start --head --num-gpus {math.ceil(gpus)}`"
                if config.device == "cpu" else "add GPU nodes, or fewer workers (--prefill/--decode)")
        raise ValueError(f"Ray offers {have_gpus:g} GPUs, {n} workers need {gpus:g} (one bundle each of "
                         f"gpus_per_worker {config.gpus_per_worker:g}); {hint}")
    if have_cpus + 1e-9 < cpus:
        raise ValueError(f"Ray offers {have_cpus:g} CPUs, {n} workers need {cpus:g} (cpus_per_worker "
                         f"{config.cpus_per_worker:g}); start Ray with more (`ray start --num-cpus N`) or lower "
                         "cpus_per_worker")
