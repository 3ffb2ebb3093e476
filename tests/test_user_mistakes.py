"""A newcomer's mistakes each get one line on stderr naming the file, key or flag, fast, with no traceback and
nothing left running (`pdserve` run as a user runs it: a subprocess)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.process_scan import marked_env, wait_none_left

BIN = Path(sys.executable).parent
Setup = Callable[[Path, Path], list[str]]  # (tmp dir, a good model dir) -> command line


def _yaml(text: str) -> Setup:
    def setup(tmp: Path, model: Path) -> list[str]:
        (tmp / "c.yaml").write_text(text)
        return ["pdserve", "up", "--config", str(tmp / "c.yaml")]
    return setup


def _model_config(**changes: object) -> Setup:
    def setup(tmp: Path, model: Path) -> list[str]:
        bad = shutil.copytree(model, tmp / "model")
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**cfg, **changes}))
        return ["pdserve", "up", "--model", str(bad)]
    return setup


def _truncated(name: str) -> Setup:
    def setup(tmp: Path, model: Path) -> list[str]:
        bad = shutil.copytree(model, tmp / "model")
        text = (bad / name).read_text()
        (bad / name).write_text(text[: len(text) // 2])
        return ["pdserve", "up", "--model", str(bad)]
    return setup


def _without(name: str) -> Setup:
    def setup(tmp: Path, model: Path) -> list[str]:
        bad = shutil.copytree(model, tmp / "model")
        (bad / name).unlink()
        return ["pdserve", "up", "--model", str(bad)]
    return setup


def _busy_port(flag: str) -> Setup:
    def setup(tmp: Path, model: Path) -> list[str]:
        other = "--http-port" if flag == "--port" else "--port"
        return ["pdserve", "up", flag, str(HOLDER.getsockname()[1]), other, "0"]
    return setup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HOLDER = socket.socket()
HOLDER.bind(("127.0.0.1", 0))
HOLDER.listen()
PORT = _free_port()  # nothing listens there

# (case, command, text the one line must contain)
CASES: list[tuple[str, Setup, str]] = [
    ("model missing", lambda t, m: ["pdserve", "up", "--model", str(t / "nope")], "nope: no such directory"),
    ("model is a file", lambda t, m: ["pdserve", "up", "--model", str(m / "config.json")], "is a file"),
    ("no config.json", _without("config.json"), "no config.json"),
    ("no tokenizer.json", _without("tokenizer.json"), "no tokenizer.json"),
    ("truncated config.json", _truncated("config.json"), "config.json: not valid JSON"),
    ("truncated tokenizer.json", _truncated("tokenizer.json"), "tokenizer.json: not valid JSON"),
    ("heads do not divide", _model_config(num_attention_heads=5), "`num_attention_heads` 5"),
    ("kv heads do not divide", _model_config(num_key_value_heads=3), "`num_key_value_heads` 3"),
    ("unknown architecture", _model_config(architectures=["GPT2LMHeadModel"]), "GPT2LMHeadModel"),
    ("port in use", _busy_port("--port"), "--port"),
    ("http port in use", _busy_port("--http-port"), "--http-port"),
    ("unknown transport", lambda t, m: ["pdserve", "up", "--transport", "foo"], "--transport"),
    ("--prefill 1.5", lambda t, m: ["pdserve", "up", "--prefill", "1.5"], "--prefill"),
    ("--prefill 0", lambda t, m: ["pdserve", "up", "--prefill", "0"], "prefill"),
    ("yaml prefill: two", _yaml("prefill: two\n"), "`prefill` must be an integer, got 'two'"),
    ("yaml prefill: 1.5", _yaml("prefill: 1.5\n"), "`prefill` must be an integer, got 1.5"),
    ("yaml quoted bool", _yaml("engine:\n  enable_prefix_caching: \"false\"\n"), "`enable_prefix_caching`"),
    ("yaml unknown key", _yaml("prefil: 2\n"), "prefil"),
    ("yaml bad indentation", _yaml("prefill: 1\n  decode: 1\nmode: x\n"), "c.yaml: invalid YAML at line"),
    ("yaml not a mapping", _yaml("- 1\n"), "c.yaml: expected a mapping"),
    ("config file missing", lambda t, m: ["pdserve", "up", "--config", str(t / "none.yaml")], "none.yaml"),
    ("ray job entrypoint", lambda t, m: [sys.executable, "-m", "cluster.serve", "--config", str(t / "x.yaml")],
     "x.yaml"),
    ("generate, nothing running", lambda t, m: ["pdserve", "generate", "hi", "--target", f"127.0.0.1:{PORT}"],
     f"--target 127.0.0.1:{PORT}"),
    ("unknown command", lambda t, m: ["pdserve", "upp"], "upp"),
]
if not list(Path("/dev").glob("nvidia[0-9]*")):
    CASES.append(("--device cuda without a GPU", lambda t, m: ["pdserve", "up", "--device", "cuda"], "--device cuda"))


@pytest.mark.parametrize(("setup", "culprit"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mistake_gets_one_line(setup: Setup, culprit: str, tmp_path: Path, tiny_llama: Path) -> None:
    cmd = setup(tmp_path, tiny_llama)
    if cmd[0] == "pdserve":
        cmd[0] = str(BIN / "pdserve")
    env, mark = marked_env()
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - start
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0, done.stdout
    assert len(lines) == 1, done.stderr
    assert culprit in lines[0], lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert elapsed < 3.0, f"{elapsed:.1f}s"
    assert not wait_none_left(mark, timeout_s=0)


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    done = subprocess.run([str(BIN / "pdserve"), "--debug", "up", "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "no such directory" in done.stderr


def test_python_without_the_dependencies_says_which(tmp_path: Path) -> None:
    """The Ray job's `python` is whatever PATH finds: without pdserve's dependencies, one line says so."""
    done = subprocess.run([sys.executable, "-S", "-m", "cluster.serve", "--config", "deploy/examples/cpu.yaml"],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "is not installed in" in done.stderr, done.stderr


def test_ray_without_gpus_names_the_flag_that_fixes_it() -> None:
    from cluster.cluster_config import ClusterConfig
    from cluster.preflight import check_ray_fits

    with pytest.raises(ValueError, match=r"Ray offers 0 GPUs, 2 workers need 2 .*`ray start --head --num-gpus 2`"):
        check_ray_fits(ClusterConfig(), {"CPU": 8.0})
    with pytest.raises(ValueError, match="Ray offers 1 CPUs"):
        check_ray_fits(ClusterConfig(), {"CPU": 1.0, "GPU": 2.0})
    check_ray_fits(ClusterConfig(gpus_per_worker=0.5), {"CPU": 2.0, "GPU": 1.0})


def test_device_is_checked_here_only_for_a_private_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray cluster's driver (the Helm head pod) may have no GPU: there Ray's resources are what counts."""
    from cluster.cluster_config import ClusterConfig
    from cluster.preflight import check

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    check(ClusterConfig(device="cuda", port=0, http_port=0))
