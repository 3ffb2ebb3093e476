"""Torch-free tokenizer for a local model directory, and incremental detokenization.

Reads `tokenizer.json` with the `tokenizers` library (importing transformers would import torch, and
the router must stay light). BOS is added when `tokenizer_config.json` says so (`add_bos_token`) or the
tokenizer's own post-processor does it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

# The chat template of models made with the built-in tokenizer (`pdserve make-model`, the built-in model):
# "role: content" lines after BOS, then "assistant:" for the reply.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


class TextTokenizer:
    """Encode prompts and decode token ids for one model directory."""

    def __init__(self, model_dir: str | Path) -> None:
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{model_dir} has no tokenizer.json (a fast tokenizer file is required)")
        self._tok = Tokenizer.from_file(str(path))
        cfg_path = Path(model_dir) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token_id = self._token_id(cfg.get("bos_token"))
        self.eos_token_id = self._token_id(cfg.get("eos_token"))
        self._add_bos = bool(cfg.get("add_bos_token", False)) and self.bos_token_id is not None

    def _token_id(self, token: str | dict | None) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens=False` for text that carries its own (a chat template's)."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text deltas.

    Holds back text that ends in an incomplete UTF-8 sequence (decoded as U+FFFD) until the next token
    completes it. `prefix_offset` keeps each decode to a short window, so the cost per token is constant.
    """

    tokenizer: TextTokenizer
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    _prefix_offset: int = 0
    _read_offset: int = 0

    def push(self, new_ids: list[int]) -> str:
        """Add tokens; return the newly completed text."""
        delta = ""
        for tid in new_ids:
            self.token_ids.append(tid)
            prefix = self.tokenizer.decode(self.token_ids[self._prefix_offset:self._read_offset])
            full = self.tokenizer.decode(self.token_ids[self._prefix_offset:])
            if full.endswith("\ufffd") or len(full) <= len(prefix):
                continue
            piece = full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
            delta += piece
        self.text += delta
        return delta


def find_stop(text: str, new_len: int, stops: tuple[str, ...]) -> int | None:
    """Index in `text` where the earliest stop string begins, looking only where the last `new_len`
    characters could have completed one; None if no stop string occurs."""
    best: int | None = None
    for s in stops:
        start = max(0, len(text) - new_len - len(s) + 1)
        i = text.find(s, start)
        if i != -1 and (best is None or i < best):
            best = i
    return best
