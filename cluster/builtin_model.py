"""The built-in small model: a tiny random-weight Llama made locally on first use (no hub)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cluster import env
from cluster.tokenizer import CHAT_TEMPLATE


def default_model_dir() -> Path:
    """Where the built-in model lives (`PDSERVE_HOME`, default ~/.cache/pdserve)."""
    home = Path(os.environ.get(env.HOME, Path.home() / ".cache" / "pdserve"))
    return home / "models" / "tiny-llama"


def ensure_builtin_model(path: Path | None = None) -> Path:
    """Make the tiny model if it is not there yet; return its directory."""
    path = path or default_model_dir()
    if not (path / "config.json").is_file():
        from cluster.engine.make_model import make_model

        print(f"pdserve: making the built-in tiny model in {path} ...", flush=True)
        make_model(path, arch="llama", shape="tiny", seed=0, overwrite=True)
    add_chat_template(path)
    return path


def add_chat_template(path: Path) -> None:
    """Give a built-in model made before it had one the built-in chat template (tokenizer_config.json)."""
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if "chat_template" not in cfg:
        cfg["chat_template"] = CHAT_TEMPLATE
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
