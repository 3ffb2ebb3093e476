"""Turn a GenerateRequest into token ids and validated SamplingParams, or an INVALID_ARGUMENT reason."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from pdserve.v1 import generate_pb2 as pb

from cluster.sampling_params import SamplingParams
from cluster.wire import sampling_from_proto
from router.errors import invalid
from router.model_info import ModelInfo

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


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
    try:
        sampling = sampling_from_proto(req.sampling)
    except ValueError as exc:
        raise invalid(f"bad sampling parameters: {exc}") from None
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise invalid("prompt is required (text or token_ids)")
    if kind == "text":
        if not req.text:
            raise invalid("prompt is empty")
        token_ids = model.tokenizer.encode(req.text)
        if not token_ids:
            raise invalid("prompt encodes to zero tokens")
    else:
        token_ids = list(req.token_ids.ids)
        if not token_ids:
            raise invalid("prompt is empty")
        for i, t in enumerate(token_ids):
            if not (0 <= t < model.vocab_size):
                raise invalid(f"token id {t} at position {i} is out of the vocabulary [0, {model.vocab_size})")
    n, limit = len(token_ids), model.max_model_len
    if n + sampling.max_tokens > limit:
        raise invalid(f"prompt ({n} tokens) + max_tokens ({sampling.max_tokens}) exceeds max_model_len ({limit})")
    return ValidRequest(req.request_id or uuid.uuid4().hex, token_ids, sampling)
