"""OpenAI response objects from the router's Delta and Final messages: whole responses and stream chunks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf.json_format import MessageToDict
from pdserve.v1 import generate_pb2 as pb

from cluster.tokenizer import TextTokenizer
from router.http.openai_protocol import SYSTEM_FINGERPRINT, Job


@dataclass
class Choice:
    """One choice's output so far (non-streaming responses and usage)."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[pb.TokenLogprobs] = field(default_factory=list)
    final: pb.Final | None = None

    def add(self, msg: pb.GenerateResponse) -> None:
        if msg.HasField("delta"):
            self.text.append(msg.delta.text)
            self.token_ids.extend(msg.delta.token_ids)
            self.logprobs.extend(msg.delta.logprobs)
        else:
            self.final = msg.final


class Shaper:
    """Builds one Job's response objects (completions or chat)."""

    def __init__(self, job: Job, tokenizer: TextTokenizer) -> None:
        self.job = job
        self._tok = tokenizer
        self._offsets: dict[int, int] = {}  # completions logprobs: text offset per choice

    def _token(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)

    def logprobs(self, index: int, entries: list[pb.TokenLogprobs]) -> dict[str, Any] | None:
        if self.job.top_logprobs is None:
            return None
        if self.job.chat:
            def item(token_id: int, logprob: float) -> dict[str, Any]:
                token = self._token(token_id)
                return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
            return {"content": [{**item(e.token_id, e.logprob),
                                 "top_logprobs": [item(t.token_id, t.logprob) for t in e.top[:self.job.top_logprobs]]}
                                for e in entries]}
        tokens = [self._token(e.token_id) for e in entries]
        offsets, at = [], self._offsets.get(index, 0)
        for t in tokens:
            offsets.append(at)
            at += len(t)
        self._offsets[index] = at
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._token(t.token_id): t.logprob for t in e.top} for e in entries],
                "text_offset": offsets}

    def usage(self, finals: list[pb.Final]) -> dict[str, Any]:
        """Prompt tokens count once per prompt (not per choice), as OpenAI counts them."""
        n = self.job.n
        prompt = sum(f.usage.prompt_tokens for f in finals[::n])
        cached = sum(f.usage.cached_prompt_tokens for f in finals[::n])
        completion = sum(f.usage.completion_tokens for f in finals)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.job.chat else "text_completion") + (".chunk" if chunk and self.job.chat
                                                                               else "")
        return {"id": self.job.response_id, "object": kind, "created": self.job.created, "model": self.job.model,
                "system_fingerprint": SYSTEM_FINGERPRINT}

    def _finish(self, choice: dict[str, Any], final: pb.Final | None) -> dict[str, Any]:
        choice["finish_reason"] = final.finish_reason if final is not None else None
        if final is not None and self.job.return_timing:
            choice["timing"] = MessageToDict(final.timing, preserving_proto_field_name=True,
                                             always_print_fields_with_no_presence=True)
        return choice

    def response(self, choices: list[Choice]) -> dict[str, Any]:
        """The whole (non-streaming) response."""
        out = []
        for i, c in enumerate(choices):
            text = "".join(c.text)
            body: dict[str, Any] = {"index": i}
            if self.job.chat:
                body["message"] = {"role": "assistant", "content": text}
            else:
                body["text"] = text
            body["logprobs"] = self.logprobs(i, c.logprobs)
            if self.job.return_token_ids:
                body["token_ids"] = list(c.token_ids)
            out.append(self._finish(body, c.final))
        return {**self._head(False), "choices": out, "usage": self.usage([c.final for c in choices if c.final])}

    def chunk(self, index: int, delta: pb.Delta | None, final: pb.Final | None = None,
              first: bool = False) -> dict[str, Any]:
        """A stream chunk for one choice: its new text (if any), and its finish reason when `final` is given."""
        text = delta.text if delta is not None else ""
        body: dict[str, Any] = {"index": index}
        if self.job.chat:
            body["delta"] = ({"role": "assistant", "content": text} if first
                             else {"content": text} if delta is not None else {})
        else:
            body["text"] = text
        body["logprobs"] = self.logprobs(index, list(delta.logprobs)) if delta is not None else None
        if self.job.return_token_ids:
            body["token_ids"] = list(delta.token_ids) if delta is not None else []
        out = {**self._head(True), "choices": [self._finish(body, final)]}
        if self.job.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, finals: list[pb.Final]) -> dict[str, Any]:
        """The last chunk with `stream_options.include_usage`: no choices, the usage."""
        return {**self._head(True), "choices": [], "usage": self.usage(finals)}
