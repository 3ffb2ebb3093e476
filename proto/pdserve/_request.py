"""Request building and response accumulation shared by the sync and async clients."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from pdserve.errors import InternalError, InvalidArgumentError
from pdserve.types import GenerateDelta, GenerateResult, Timing, TokenLogprobs, Usage
from pdserve.v1 import generate_pb2 as pb
from pdserve.v1 import generate_pb2_grpc as pb_grpc


def build_request(
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 16,
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    ignore_eos: bool = False,
    logprobs: int | None = None,
    request_id: str | None = None,
    model: str = "",
) -> pb.GenerateRequest:
    """A GenerateRequest; values the wire cannot carry raise InvalidArgumentError (range checks are the
    server's job, so the reasons match whatever client sent the request)."""
    try:
        sampling = pb.SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            stop_token_ids=list(stop_token_ids or ()),
            stop=[stop] if isinstance(stop, str) else list(stop or ()),
            ignore_eos=ignore_eos, logprobs=logprobs,
        )
        req = pb.GenerateRequest(sampling=sampling, request_id=request_id or "", model=model)
        if isinstance(prompt, str):
            req.text = prompt
        elif isinstance(prompt, Sequence) and not isinstance(prompt, bytes):
            req.token_ids.ids.extend(prompt)
            if not prompt:
                req.token_ids.SetInParent()  # keep the oneof set: the server reports "prompt is empty"
        else:
            raise TypeError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"cannot encode request: {exc}") from None
    return req


class Accumulator:
    """Folds streamed GenerateResponses into deltas and, at the end, a GenerateResult."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.request_id = ""
        self.token_ids: list[int] = []
        self.texts: list[str] = []
        self.logprobs: list[TokenLogprobs] = []
        self.final: GenerateDelta | None = None
        self.finished_at: float | None = None

    def add(self, msg: pb.GenerateResponse) -> GenerateDelta:
        self.request_id = msg.request_id or self.request_id
        if msg.HasField("final"):
            f = msg.final
            self.finished_at = time.perf_counter()
            self.final = GenerateDelta(
                request_id=self.request_id, finish_reason=f.finish_reason or "stop",
                usage=Usage.from_proto(f.usage), timing=Timing.from_proto(f.timing),
                prefill_worker=f.prefill_worker, decode_worker=f.decode_worker, num_migrations=f.num_migrations,
            )
            return self.final
        d = msg.delta
        if d.token_ids and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        lps = [TokenLogprobs.from_proto(x) for x in d.logprobs]
        self.token_ids.extend(d.token_ids)
        self.texts.append(d.text)
        self.logprobs.extend(lps)
        return GenerateDelta(request_id=self.request_id, token_ids=list(d.token_ids), text=d.text,
                             logprobs=lps or None)

    def result(self) -> GenerateResult:
        if self.final is None:
            raise InternalError("the stream ended without a final message")
        f = self.final
        return GenerateResult(
            request_id=self.request_id, text="".join(self.texts), token_ids=self.token_ids,
            finish_reason=f.finish_reason or "stop", usage=f.usage or Usage(), timing=f.timing or Timing(),
            logprobs=self.logprobs or None,
            ttft_s=None if self.first_token_at is None else self.first_token_at - self.started,
            total_s=(self.finished_at or time.perf_counter()) - self.started,
            prefill_worker=f.prefill_worker, decode_worker=f.decode_worker, num_migrations=f.num_migrations,
        )


API_KEY_ENV = "PDSERVE_API_KEY"


@dataclass(frozen=True)
class Security:
    """How a client reaches the router: its API key (sent as `authorization: Bearer KEY` metadata; None:
    `PDSERVE_API_KEY`, if set) and TLS (`tls=True`; PEM bytes: the CA to trust, default the system's, and
    for mutual TLS the client's key and certificate chain)."""

    api_key: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV, "")
        return (("authorization", f"Bearer {key}"),) if key else ()

    def channel(self, grpc_module: Any, target: str, options: list[tuple[str, Any]]) -> Any:
        """A channel of `grpc` or `grpc.aio`, secure when `tls` (or any PEM is given)."""
        if not (self.tls or self.root_certificates or self.private_key or self.certificate_chain):
            return grpc_module.insecure_channel(target, options=options)
        creds = grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)
        return grpc_module.secure_channel(target, creds, options=options)


class ClientBase:
    """What `Client` and `AsyncClient` share: the channel, the stub, the call metadata and the default
    deadline."""

    def __init__(self, target: str, timeout: float | None, options: Sequence[tuple[str, Any]] | None,
                 grpc_module: Any, security: Security) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = security.metadata()
        self._channel = security.channel(grpc_module, target, list(options or ()))
        self._stub = pb_grpc.GenerateServiceStub(self._channel)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout
