"""A model's chat template, rendered with jinja2 the way transformers' `apply_chat_template` does (its sandbox,
`trim_blocks`/`lstrip_blocks`, `tojson`, `raise_exception`, `strftime_now`, `{% generation %}`, the special
tokens as variables), without importing transformers or torch.

The template comes from `chat_template.jinja`, `chat_template.json` or `tokenizer_config.json`'s
`chat_template` (a string, or a list of named templates: "default" is used), in that order, as transformers
looks for them.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _token_text(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _read_template(model_dir: Path, tok_cfg: dict[str, Any]) -> str | None:
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text()
    if (model_dir / "chat_template.json").is_file():
        return json.loads((model_dir / "chat_template.json").read_text()).get("chat_template")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


class ChatTemplate:
    """Renders a conversation into the prompt text the model was trained on."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_Generation, loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(source)
        self._special = special_tokens

    @classmethod
    def load(cls, model_dir: str | Path) -> ChatTemplate | None:
        """The model directory's template, or None if it has none."""
        path = Path(model_dir)
        cfg_path = path / "tokenizer_config.json"
        tok_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        source = _read_template(path, tok_cfg)
        if not source:
            return None
        special = {k: text for k in SPECIAL_TOKENS if (text := _token_text(tok_cfg.get(k))) is not None}
        return cls(source, special)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               **kwargs: Any) -> str:
        """The prompt text; jinja2.TemplateError if the template refuses the conversation."""
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **{"tools": None, "documents": None, **self._special, **kwargs})
