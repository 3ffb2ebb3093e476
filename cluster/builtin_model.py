"""The built-in small model: a tiny random-weight Llama made locally on first use (no hub)."""

from __future__ import annotations

import os
from pathlib import Path


def default_model_dir() -> Path:
    """Where the built-in model lives (`PDSERVE_HOME`, default ~/.cache/pdserve)."""
    home = Path(os.environ.get("PDSERVE_HOME", Path.home() / ".cache" / "pdserve"))
    return home / "models" / "tiny-llama"


def ensure_builtin_model(path: Path | None = None) -> Path:
    """Make the tiny model if it is not there yet; return its directory."""
    path = path or default_model_dir()
    if not (path / "config.json").is_file():
        from cluster.engine.make_model import make_model

        print(f"pdserve: making the built-in tiny model in {path} ...", flush=True)
        make_model(path, arch="llama", shape="tiny", seed=0, overwrite=True)
    return path
