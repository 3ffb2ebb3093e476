"""`POST /v1/completions` and `POST /v1/chat/completions` on the router's request path (`Orchestrator.generate`).

Streaming answers are server-sent events: `data: {chunk}` lines, then `data: [DONE]`. The status (400, 404,
429, 503, ...) is known before the first byte: the stream starts once every choice has its first token.
An error after that arrives as a `data: {"error": ...}` event before `[DONE]`. A client that leaves its stream
unread for `stream_idle_timeout_s` has its connection closed (`router.client_stream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import jinja2
from aiohttp import web
from pdserve.v1 import generate_pb2 as pb

from router.client_stream import StreamIdle, write_or_idle
from router.errors import RouterError
from router.http.chat_template import ChatTemplate
from router.http.errors import ApiError, bad_request
from router.http.openai_protocol import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    Job,
    chat_messages,
    completion_prompts,
    parse_job,
)
from router.http.responses import Choice, Shaper
from router.http.runs import ChoiceRuns
from router.metrics import RouterMetrics
from router.orchestrator import Orchestrator
from router.validation import max_body_bytes

log = logging.getLogger(__name__)
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
LONG_TEXT = 4096  # characters: tokenize off the event loop beyond this


def _no_deadline() -> float | None:
    return None


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _event(obj: Any) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode()


async def read_body(request: web.Request, limit: int) -> dict[str, Any]:
    """The JSON object in the body; 400 without reading it if it is over `limit` bytes (`max_body_bytes`)."""
    size = request.content_length
    if size is not None and size > limit:
        raise _too_large(f"{size} bytes", limit)
    try:
        raw = await request.read()  # the application's client_max_size stops a chunked body at the limit
    except web.HTTPRequestEntityTooLarge:
        raise _too_large("more", limit) from None
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _too_large(size: str, limit: int) -> ApiError:
    return bad_request(f"the request body ({size}) is larger than any request this model can take: at most {limit} "
                       "bytes (2x the largest prompt of max_model_len tokens, for JSON's escapes)")


def reset(request: web.Request) -> None:
    """Close the request's connection with a reset (SO_LINGER 0, as nginx's reset_timedout_connection): a
    plain close would keep the unread bytes in the kernel, and send its FIN only after them."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class Completions:
    """The two generation endpoints of one router."""

    def __init__(self, orchestrator: Orchestrator, metrics: RouterMetrics, template: ChatTemplate | None) -> None:
        self.orch = orchestrator
        self.model = orchestrator.model
        self.max_body = max_body_bytes(self.model)
        self.metrics = metrics
        self.template = template

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise bad_request("'model' must be a string", "model")
        if model and model != self.model.name:
            raise ApiError(404, f"The model '{model}' does not exist: this server serves '{self.model.name}'",
                           param="model", code="model_not_found")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request, self.max_body)
        self._check_model(body)
        prompts = completion_prompts(body, self.model.max_model_len)
        job = parse_job(body, False, self.model.name, prompts, COMPLETIONS_DEFAULT_MAX_TOKENS)
        return await self._answer(request, job)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request, self.max_body)
        self._check_model(body)
        if self.template is None:
            raise bad_request(f"model '{self.model.name}' has no chat template (tokenizer_config.json "
                              "chat_template): use /v1/completions")
        messages = chat_messages(body)
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise bad_request("'chat_template_kwargs' must be an object", "chat_template_kwargs")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("messages", "add_generation_prompt")}
        if isinstance(body.get("tools"), list):  # offered to the template, as transformers does
            kwargs.setdefault("tools", body["tools"])
        try:
            text = self.template.render(messages, bool(body.get("add_generation_prompt", True)), **kwargs)
        except jinja2.TemplateError as exc:
            raise bad_request(f"the chat template refused the messages: {exc}", "messages") from None
        encode = self.model.tokenizer.encode
        ids = await asyncio.to_thread(encode, text, False) if len(text) > LONG_TEXT else encode(text, False)
        if not ids:
            raise bad_request("the conversation renders to zero tokens", "messages")
        room = max(1, self.model.max_model_len - len(ids))  # no max_tokens: as many as fit, as vLLM does
        return await self._answer(request, parse_job(body, True, self.model.name, [ids], room))

    def _generate(self, req: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        return self.metrics.track(self.orch.generate(req, _no_deadline))

    async def _answer(self, request: web.Request, job: Job) -> web.StreamResponse:
        runs = ChoiceRuns(self._generate, job.requests())
        shaper = Shaper(job, self.model.tokenizer)
        try:
            if job.stream:
                return await self._stream(request, job, shaper, runs)
            choices = [Choice() for _ in range(len(job.prompts) * job.n)]
            async for batch in runs.batches():
                for index, msg in batch:
                    choices[index].add(msg)
            return web.Response(text=dumps(shaper.response(choices)), content_type="application/json")
        except RouterError as err:
            raise ApiError.from_router(err) from None
        finally:
            await runs.close()

    async def _stream(self, request: web.Request, job: Job, shaper: Shaper, runs: ChoiceRuns) -> web.StreamResponse:
        await runs.started()  # a RouterError here is still an HTTP status
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        idle_s = self.orch.config.stream_idle_timeout_s

        async def send(data: bytes) -> None:
            await write_or_idle(resp.write(data), idle_s)

        count = len(job.prompts) * job.n
        finals: dict[int, pb.Final] = {}
        head = b"".join(_event(shaper.chunk(i, None, first=True)) for i in range(count)) if job.chat else b""
        try:
            try:
                async for batch in runs.batches():
                    await send(head + self._chunks(shaper, batch, finals))
                    head = b""
            except RouterError as err:
                await send(_event(ApiError.from_router(err).body()) + b"data: [DONE]\n\n")
                return resp
            tail = _event(shaper.usage_chunk([finals[i] for i in sorted(finals)])) if job.include_usage else b""
            await send(tail + b"data: [DONE]\n\n")
            await write_or_idle(resp.write_eof(), idle_s)
        except StreamIdle as idle:  # the client's TCP window stays shut: free the request, reset the connection
            log.info("%s: %s", request.path, idle.reason)
            await runs.close()
            reset(request)
        return resp

    @staticmethod
    def _chunks(shaper: Shaper, batch: list[tuple[int, pb.GenerateResponse]], finals: dict[int, pb.Final]) -> bytes:
        """One batch as events; a choice's last delta and its final go out as one chunk when they arrive
        together (finish_reason on the last content chunk), else the final is a chunk of its own."""
        out: list[bytes] = []
        held: dict[int, pb.Delta] = {}
        for index, msg in batch:
            if msg.HasField("delta"):
                if index in held:
                    out.append(_event(shaper.chunk(index, held[index])))
                if msg.delta.text or msg.delta.logprobs or shaper.job.return_token_ids:  # else: text held back
                    held[index] = msg.delta
            else:
                out.append(_event(shaper.chunk(index, held.pop(index, None), msg.final)))
                finals[index] = msg.final
        out.extend(_event(shaper.chunk(index, delta)) for index, delta in held.items())
        return b"".join(out)

