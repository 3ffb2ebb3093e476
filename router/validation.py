"""Turn a GenerateRequest into token ids and validated SamplingParams, or an INVALID_ARGUMENT reason.

Sizes are checked before any work that grows with them: a text prompt's byte length before tokenizing (at
most `MAX_BYTES_PER_TOKEN` bytes for each token of the context), a token-id list's length before it is
read, then its range in one numpy pass (no per-id Python loop on the event loop), the stop strings' count
and size before they are copied.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

import numpy as np
from pdserve.v1 import generate_pb2 as pb

from cluster.sampling_params import SamplingParams
from cluster.wire import sampling_from_proto
from router.errors import invalid
from router.model_info import ModelInfo

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
MAX_BYTES_PER_TOKEN = 64  # no tokenizer we serve packs more text into one token: a longer prompt cannot fit
MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 1024  # per stop string
MAX_STOP_TOKEN_IDS = 1024
_MAX_FIELD_BYTES = 11  # one repeated scalar on the wire at most: a tag byte and a 10-byte varint


def max_request_bytes(model: ModelInfo) -> int:
    """An upper bound on a serialized GenerateRequest that `validate` could accept for `model` (the prompt at
    its limit, every stop at its limit, the longest request id, the model's name, the scalars): the public
    guard refuses a larger message before it is parsed, which for megabytes would hold the event loop."""
    prompt = max(MAX_BYTES_PER_TOKEN, _MAX_FIELD_BYTES) * model.max_model_len
    stops = MAX_STOP_STRINGS * (MAX_STOP_BYTES + 8) + MAX_STOP_TOKEN_IDS * _MAX_FIELD_BYTES
    return prompt + stops + len(model.name.encode()) + 1024


def max_body_bytes(model: ModelInfo) -> int:
    """An upper bound on an HTTP request body (JSON) worth reading for `model`: the largest GenerateRequest,
    its strings at most doubled by JSON's escapes (a batch of prompts shares it). A larger body is refused
    before it is read: parsing megabytes of JSON (millions of token ids) would hold the event loop."""
    return 2 * max_request_bytes(model)


@dataclass(frozen=True)
class ValidRequest:
    request_id: str
    token_ids: list[int]
    sampling: SamplingParams


def validate(req: pb.GenerateRequest, model: ModelInfo) -> ValidRequest:
    """Check everything the router can check before touching a worker; RouterError(INVALID_ARGUMENT)."""
    if req.model and req.model != model.name:
        raise invalid(f"unknown model {req.model!r}: this server serves {model.name!r}")
    if req.request_id and not _REQUEST_ID.match(req.request_id):
        raise invalid("request_id must be 1-128 characters of letters, digits and ._:-")
    _check_stops(req.sampling)
    try:
        sampling = sampling_from_proto(req.sampling)
    except ValueError as exc:
        raise invalid(f"bad sampling parameters: {exc}") from None
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise invalid("prompt is required (text or token_ids)")
    limit = model.max_model_len
    if kind == "text":
        if not req.text:
            raise invalid("prompt is empty")
        size = len(req.text.encode())
        if size > MAX_BYTES_PER_TOKEN * limit:
            raise invalid(f"prompt of {size} bytes cannot fit in max_model_len ({limit} tokens)")
        token_ids = model.tokenizer.encode(req.text)
        if not token_ids:
            raise invalid("prompt encodes to zero tokens")
    else:
        ids = req.token_ids.ids
        if not ids:
            raise invalid("prompt is empty")
        if len(ids) + sampling.max_tokens > limit:  # before the ids are read
            raise invalid(f"prompt ({len(ids)} tokens) + max_tokens ({sampling.max_tokens}) exceeds max_model_len "
                          f"({limit})")
        token_ids = _in_vocab(np.array(ids, dtype=np.int64), model.vocab_size)
    n = len(token_ids)
    if n + sampling.max_tokens > limit:
        raise invalid(f"prompt ({n} tokens) + max_tokens ({sampling.max_tokens}) exceeds max_model_len ({limit})")
    return ValidRequest(req.request_id or uuid.uuid4().hex, token_ids, sampling)


def _in_vocab(ids: np.ndarray, vocab_size: int) -> list[int]:
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        i = int(bad[0])
        raise invalid(f"token id {int(ids[i])} at position {i} is out of the vocabulary [0, {vocab_size})")
    return ids.tolist()


def _check_stops(m: pb.SamplingParams) -> None:
    if len(m.stop) > MAX_STOP_STRINGS:
        raise invalid(f"at most {MAX_STOP_STRINGS} stop strings, got {len(m.stop)}")
    if any(len(s.encode()) > MAX_STOP_BYTES for s in m.stop):
        raise invalid(f"a stop string may have at most {MAX_STOP_BYTES} bytes")
    if len(m.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise invalid(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(m.stop_token_ids)}")
