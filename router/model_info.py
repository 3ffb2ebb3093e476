"""What the router knows about the served model, read torch-free from its directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cluster.tokenizer import TextTokenizer

_HUGE = 10**8  # tokenizer_config's "no limit" sentinel is ~1e30


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int  # ids in [0, vocab_size) are accepted as prompt tokens
    tokenizer: TextTokenizer

    @classmethod
    def load(cls, model_dir: str, served_name: str | None = None, max_model_len: int | None = None) -> ModelInfo:
        """Tokenizer from `tokenizer.json`; limits from config.json / tokenizer_config.json unless given."""
        path = Path(model_dir)
        if not path.is_dir():
            raise ValueError(f"model directory {model_dir} does not exist")
        tok = TextTokenizer(path)
        cfg = _read_json(path / "config.json")
        tok_cfg = _read_json(path / "tokenizer_config.json")
        if max_model_len is None:
            max_model_len = cfg.get("max_position_embeddings")
            if max_model_len is None and int(tok_cfg.get("model_max_length", _HUGE)) < _HUGE:
                max_model_len = int(tok_cfg["model_max_length"])
        if max_model_len is None:
            raise ValueError(f"cannot tell max_model_len from {model_dir}: give RouterConfig.max_model_len")
        vocab = max(int(cfg.get("vocab_size", 0)), tok.vocab_size)
        return cls(served_name or path.resolve().name, int(max_model_len), vocab, tok)
