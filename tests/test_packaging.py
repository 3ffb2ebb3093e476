"""Packaging facts a user meets before any code runs: the protobuf floor matches the generated code."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def test_protobuf_floor_matches_the_generated_code() -> None:
    """Each `*_pb2.py` refuses an older protobuf runtime than the one that generated it (VersionError at import),
    so pyproject's floor must be at least the newest generator's version."""
    generated = [re.search(r"# Protobuf Python Version: ([\d.]+)", p.read_text()) for p in
                 sorted((ROOT / "proto" / "pdserve" / "v1").glob("*_pb2.py"))]
    assert generated and all(generated)
    needed = max(_version(m.group(1)) for m in generated if m)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(re.fullmatch(r"protobuf>=([\d.]+)", d.split(";")[0].strip()) for d in deps if d.startswith("protobuf"))
    assert floor and _version(floor.group(1)) >= needed, f"protobuf floor {floor} < generated {needed}"


def test_bench_plots_are_an_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("matplotlib") for d in project["dependencies"])
    assert "matplotlib" in project["optional-dependencies"]["bench"]


def test_sdk_imports_beside_a_checkout_named_pdserve(tmp_path: Path) -> None:
    """From the parent directory of a checkout called `pdserve` (as `git clone` names it), that directory is only a
    namespace candidate on the path scan; the installed package (a regular one) must still win."""
    (tmp_path / "pdserve").symlink_to(ROOT, target_is_directory=True)
    done = subprocess.run([sys.executable, "-c", "from pdserve import Client; print(Client.__module__)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "pdserve.client"


def test_the_sdk_reads_the_api_key_variable_the_env_list_names() -> None:
    """The SDK cannot import `cluster` (it installs alone), so it names PDSERVE_API_KEY itself."""
    from pdserve._request import API_KEY_ENV

    from cluster import env

    assert env.API_KEY == API_KEY_ENV
