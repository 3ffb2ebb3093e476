"""`pdserve bench serve --backend openai`: the load generator's client over the OpenAI-compatible HTTP API.

It offers what the benchmark uses of `pdserve.AsyncClient` (`wait_until_serving`, `server_info`,
`generate_stream` yielding deltas with `token_ids` and, last, `timing`), so both fronts are driven and timed
the same way. Requests are streamed `POST /v1/completions` with token-id prompts, `ignore_eos`,
`return_token_ids` (tokens per chunk, as vLLM names it) and `return_timing` (the server's own phases).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import aiohttp
from pdserve._request import API_KEY_ENV

FALLBACK_VOCAB = 256  # token ids every byte-level tokenizer has, when neither server nor --model says more


@dataclass(frozen=True)
class HttpServerInfo:
    model: str
    max_model_len: int
    vocab_size: int


@dataclass
class HttpDelta:
    token_ids: list[int]
    timing: Any = None  # the server's timing (attributes in ms), on the last delta


class HttpStream:
    """One streamed completion: an async context manager and an iterator of deltas."""

    def __init__(self, session: aiohttp.ClientSession, url: str, body: dict[str, Any], timeout: float | None) -> None:
        self._session, self._url, self._body, self._timeout = session, url, body, timeout
        self._resp: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> HttpStream:
        self._resp = await self._session.post(self._url, json=self._body,
                                              timeout=aiohttp.ClientTimeout(total=self._timeout))
        if self._resp.status != 200:
            detail = await self._resp.text()
            self._resp.release()
            raise RuntimeError(f"HTTP {self._resp.status}: {detail}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._resp is not None:
            self._resp.release()

    async def __aiter__(self) -> AsyncIterator[HttpDelta]:
        assert self._resp is not None, "use `async with` first"
        async for raw in self._resp.content:
            line = raw.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: "):]
            if data == b"[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk["choices"]:
                timing = choice.get("timing")
                yield HttpDelta(choice.get("token_ids", []), SimpleNamespace(**timing) if timing else None)


class OpenAIHttpClient:
    """The subset of `pdserve.AsyncClient` that `pdserve bench serve` drives, over HTTP."""

    def __init__(self, base_url: str, timeout: float | None = None, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._model = ""

    async def __aenter__(self) -> OpenAIHttpClient:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=self._headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use `async with OpenAIHttpClient(...)`"
        return self._session

    async def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Poll `GET /health` until 200; RuntimeError after `timeout` seconds."""
        deadline, last = time.monotonic() + timeout, "no answer"
        while time.monotonic() < deadline:
            try:
                async with self.session.get(f"{self.base_url}/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
                    last = f"HTTP {r.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = str(exc) or type(exc).__name__
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.base_url} did not become healthy in {timeout:g} s: {last}")

    async def server_info(self) -> HttpServerInfo:
        """The served model from `GET /v1/models` (max_model_len as vLLM and pdserve report it)."""
        async with self.session.get(f"{self.base_url}/v1/models") as r:
            if r.status != 200:
                raise RuntimeError(f"GET /v1/models: HTTP {r.status}: {await r.text()}")
            card = (await r.json())["data"][0]
        self._model = card["id"]
        return HttpServerInfo(card["id"], int(card.get("max_model_len", 2**31 - 1)),
                              int(card.get("vocab_size", FALLBACK_VOCAB)))

    def generate_stream(self, prompt: Sequence[int], *, max_tokens: int, temperature: float, seed: int | None,
                        ignore_eos: bool, timeout: float | None = None) -> HttpStream:
        body: dict[str, Any] = {"model": self._model, "prompt": list(prompt), "max_tokens": max_tokens,
                                "temperature": temperature, "ignore_eos": ignore_eos, "stream": True,
                                "return_token_ids": True, "return_timing": True}
        if seed is not None:
            body["seed"] = seed
        return HttpStream(self.session, f"{self.base_url}/v1/completions", body, timeout or self.timeout)
