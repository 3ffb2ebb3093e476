"""The CLI and offline API read as a user expects: --version, defaults in every --help, dtype objects."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

PDSERVE = str(Path(sys.executable).parent / "pdserve")


def test_version() -> None:
    from importlib.metadata import version

    out = subprocess.run([PDSERVE, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"pdserve {version('pdserve')}"


@pytest.mark.parametrize("command", [["up"], ["generate"], ["demo"], ["make-model"], ["offline"], ["bench", "serve"],
                                     ["bench", "engine"]])
def test_help_shows_defaults(command: list[str]) -> None:
    out = subprocess.run([PDSERVE, *command, "--help"], capture_output=True, text=True, check=True).stdout
    assert "(default:" in out


def test_one_default_target() -> None:
    out = {c: subprocess.run([PDSERVE, *c, "--help"], capture_output=True, text=True, check=True).stdout
           for c in (("generate",), ("bench", "serve"))}
    assert all("127.0.0.1:50051" in text for text in out.values()), out


def test_llm_takes_a_torch_dtype(tiny_llama: Path) -> None:
    from cluster.engine import LLM

    llm = LLM(str(tiny_llama), dtype=torch.float32, num_kv_blocks=16)
    assert llm.engine.config.dtype == "float32"
