"""OpenAI request bodies -> GenerateRequests, and the router's responses -> OpenAI response objects.

Only types are checked here (HTTP 400 naming the parameter); value ranges are the router's own validation,
the same rules as the gRPC API. Unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pdserve import __version__
from pdserve.v1 import generate_pb2 as pb

from router.http.errors import bad_request

SYSTEM_FINGERPRINT = f"pdserve-{__version__}"
SEED_LIMIT = 2**63
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat: what fits the context


def _get(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise bad_request(f"'{name}' must be {what}, got {type(value).__name__}", name)
    return value


def _int(body: dict[str, Any], name: str) -> int | None:
    return _get(body, name, (int,), "an integer")


def _float(body: dict[str, Any], name: str) -> float | None:
    v = _get(body, name, (int, float), "a number")
    return None if v is None else float(v)


def _bool(body: dict[str, Any], name: str) -> bool:
    return bool(_get(body, name, (bool,), "a boolean"))


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    return stops


def _token_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def completion_prompts(body: dict[str, Any], max_model_len: int) -> list[str | list[int]]:
    """`prompt` as a list of prompts: a string, strings, token ids, or lists of token ids. A list of more ids
    than the context holds is refused before its ids are looked at."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        for ids in prompt if isinstance(prompt[0], list) else [prompt]:
            if isinstance(ids, list) and len(ids) > max_model_len and isinstance(ids[0], int):
                raise bad_request(f"prompt ({len(ids)} tokens) exceeds max_model_len ({max_model_len})", "prompt")
    if _token_list(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _token_list(p) for p in prompt):
        return list(prompt)
    raise bad_request("'prompt' must be a string, a list of strings, a list of token ids or a list of token id "
                      "lists (non-empty)", "prompt")


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """`messages` with text-part lists joined into one string (the "string" content format)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise bad_request("'messages' must be a non-empty list of message objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}].role must be a string", "messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad_request(f"messages[{i}].content: only text parts are supported", "messages")
            content = "\n".join(p["text"] for p in content)
        elif content is not None and not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({**m, "content": content})
    return out


@dataclass(frozen=True)
class Job:
    """One OpenAI request: `n` choices per prompt, each one GenerateRequest (choice index p * n + i)."""

    chat: bool
    model: str
    prompts: list[str | list[int]]
    sampling: pb.SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None  # completions `logprobs`; chat `top_logprobs` when `logprobs` is true
    return_timing: bool = False  # pdserve extension: per-choice server-side timing
    return_token_ids: bool = False  # as vLLM's: each choice (or chunk) carries its generated token ids
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def response_id(self) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{self.id}"

    def requests(self) -> list[pb.GenerateRequest]:
        reqs = []
        for p, prompt in enumerate(self.prompts):
            for i in range(self.n):
                s = pb.SamplingParams()
                s.CopyFrom(self.sampling)
                if s.HasField("seed") and i:  # n seeded choices differ from each other, reproducibly
                    s.seed = (s.seed + i) % SEED_LIMIT
                req = pb.GenerateRequest(sampling=s, request_id=f"{self.id}-{p * self.n + i}", model=self.model)
                if isinstance(prompt, str):
                    req.text = prompt
                else:
                    req.token_ids.ids.extend(prompt)
                reqs.append(req)
        return reqs


def _set(sampling: pb.SamplingParams, name: str, value: int, param: str | None = None) -> None:
    """An integer field; one outside the field's range (int32, int64) is refused here, the rest by validation."""
    try:
        setattr(sampling, name, value)
    except ValueError:
        raise bad_request(f"'{param or name}' is out of range: {value}", param or name) from None


def parse_job(body: dict[str, Any], chat: bool, model: str, prompts: list[str | list[int]],
              default_max_tokens: int) -> Job:
    """The request's sampling and output options (its prompts already parsed)."""
    sampling = pb.SamplingParams(stop=_stop(body), ignore_eos=_bool(body, "ignore_eos"))
    max_tokens = (_int(body, "max_completion_tokens") if chat else None) or _int(body, "max_tokens")
    _set(sampling, "max_tokens", default_max_tokens if max_tokens is None else max_tokens)
    for name in ("temperature", "top_p"):
        if (v := _float(body, name)) is not None:
            setattr(sampling, name, v)
    for name in ("top_k", "seed"):
        if (v := _int(body, name)) is not None:
            _set(sampling, name, v)
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not (stop_ids == [] or _token_list(stop_ids)):
            raise bad_request("'stop_token_ids' must be a list of token ids", "stop_token_ids")
        sampling.stop_token_ids.extend(stop_ids)
    if chat:
        top = _int(body, "top_logprobs")
        top = (top or 0) if _bool(body, "logprobs") else None
    else:
        top = _int(body, "logprobs")
    if top is not None:
        _set(sampling, "logprobs", top, "top_logprobs" if chat else "logprobs")
    n = _int(body, "n")
    n = 1 if n is None else n
    if not 1 <= n <= 128:
        raise bad_request(f"'n' must be in [1, 128], got {n}", "n")
    options = _get(body, "stream_options", (dict,), "an object") or {}
    return Job(chat=chat, model=model, prompts=prompts, sampling=sampling, n=n, stream=_bool(body, "stream"),
               include_usage=bool(options.get("include_usage")), top_logprobs=top,
               return_timing=_bool(body, "return_timing"), return_token_ids=_bool(body, "return_token_ids"))
