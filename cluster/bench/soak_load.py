"""The client side of `bench soak`: a seeded mix of requests (`plan`), and a client process that sends them over
raw gRPC at a fixed concurrency and records how each one ended (`run_client`).

Kinds: `normal` (random prompt and output lengths, ignore_eos, a generous deadline), `cancel` (the client
cancels after a few deltas), `deadline` (a deadline too short for the whole output) and `bad` (one of a table
of malformed requests the router must refuse with INVALID_ARGUMENT). `EXPECTED` says which statuses each kind
may end with, `FAULT_STATUSES` those a request may also end with shortly after a fault; anything else
(INTERNAL, UNKNOWN, a bare CANCELLED, a short output, a hang past the deadline, UNAVAILABLE with no fault)
is unexpected, and the soak fails on it.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import grpc
from pdserve.v1 import generate_pb2 as pb
from pdserve.v1 import generate_pb2_grpc as pb_grpc

KINDS = ("normal", "cancel", "deadline", "bad")
# What a fault (a killed worker, Redis restarting) may give a request that reached work, shortly after it.
FAULT_STATUSES = frozenset({"UNAVAILABLE", "ABORTED"})
EXPECTED = {  # at any time; RESOURCE_EXHAUSTED is the answer to an overload
    "normal": frozenset({"OK", "RESOURCE_EXHAUSTED"}),
    "cancel": frozenset({"OK", "CLIENT_CANCELLED", "RESOURCE_EXHAUSTED"}),
    "deadline": frozenset({"OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}),
    "bad": frozenset({"INVALID_ARGUMENT"}),
}
BAD_VARIANTS = ("empty_prompt", "zero_max_tokens", "negative_temperature", "top_p_zero", "token_out_of_vocab",
                "too_long", "too_many_logprobs", "unknown_model", "bad_request_id")
PROGRESS_EVERY = 20  # requests between progress reports to the parent


@dataclass(frozen=True)
class Mix:
    """The shares of each kind and the length ranges of a soak."""

    input_range: tuple[int, int] = (4, 200)
    output_range: tuple[int, int] = (1, 64)
    cancel_share: float = 0.05
    deadline_share: float = 0.05
    bad_share: float = 0.05
    deadline_range_s: tuple[float, float] = (0.02, 0.5)
    timeout_s: float = 120.0  # normal and cancelled requests: past this the client gives up (a hang)

    def __post_init__(self) -> None:
        if not 0 <= self.cancel_share + self.deadline_share + self.bad_share <= 1:
            raise ValueError("the cancel, deadline and bad shares must add up to at most 1")
        for name in ("input_range", "output_range"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be LO,HI with 1 <= LO <= HI, got {lo},{hi}")


@dataclass(frozen=True)
class Spec:
    """One planned request."""

    index: int
    kind: str
    prompt: tuple[int, ...]
    max_tokens: int
    timeout_s: float
    cancel_after: int = 0  # cancel: deltas read before the client cancels
    bad: str = ""  # bad: which of BAD_VARIANTS


def plan(n: int, mix: Mix, vocab_size: int, max_model_len: int, seed: int) -> list[Spec]:
    """`n` requests drawn from `mix`, reproducible from `seed`; every good one fits `max_model_len`."""
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        u = rng.random()
        kind = ("cancel" if u < mix.cancel_share else "deadline" if u < mix.cancel_share + mix.deadline_share
                else "bad" if u < mix.cancel_share + mix.deadline_share + mix.bad_share else "normal")
        out = rng.randint(*mix.output_range)
        prompt_len = min(rng.randint(*mix.input_range), max_model_len - out)
        prompt = tuple(rng.randrange(3, vocab_size) for _ in range(prompt_len))
        timeout = rng.uniform(*mix.deadline_range_s) if kind == "deadline" else mix.timeout_s
        specs.append(Spec(i, kind, prompt, out, timeout, cancel_after=rng.randint(1, 4) if kind == "cancel" else 0,
                          bad=rng.choice(BAD_VARIANTS) if kind == "bad" else ""))
    return specs


def request(spec: Spec, vocab_size: int, max_model_len: int) -> pb.GenerateRequest:
    """The GenerateRequest of `spec` (for `bad`, malformed in its variant's way)."""
    sampling = pb.SamplingParams(max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True)
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=spec.prompt), sampling=sampling,
                             request_id=f"soak-{spec.index}")
    match spec.bad:
        case "empty_prompt":
            req.ClearField("token_ids")
        case "zero_max_tokens":
            req.sampling.max_tokens = 0
        case "negative_temperature":
            req.sampling.temperature = -1.0
        case "top_p_zero":
            req.sampling.top_p = 0.0
        case "token_out_of_vocab":
            req.token_ids.ids.append(vocab_size + 7)
        case "too_long":
            req.token_ids.ids.extend([5] * max_model_len)
        case "too_many_logprobs":
            req.sampling.logprobs = 21
        case "unknown_model":
            req.model = "no-such-model"
        case "bad_request_id":
            req.request_id = "spaces are not allowed"
    return req


async def send(stub: pb_grpc.GenerateServiceStub, spec: Spec, vocab_size: int,
               max_model_len: int) -> tuple[str, str]:
    """Send one planned request; (status, detail): a gRPC status name, CLIENT_CANCELLED, or SHORT_OUTPUT."""
    call = stub.Generate(request(spec, vocab_size, max_model_len), timeout=spec.timeout_s)
    deltas = tokens = 0
    try:
        async for msg in call:
            if msg.HasField("delta"):
                deltas += 1
                tokens += len(msg.delta.token_ids)
                if spec.cancel_after and deltas >= spec.cancel_after:
                    call.cancel()
                    return "CLIENT_CANCELLED", f"after {deltas} deltas"
    except grpc.aio.AioRpcError as err:
        return err.code().name, err.details() or ""
    except asyncio.CancelledError:  # our own cancel, when it lands inside the read
        return "CLIENT_CANCELLED", f"after {deltas} deltas"
    if tokens != spec.max_tokens:
        return "SHORT_OUTPUT", f"{tokens} of {spec.max_tokens} tokens with ignore_eos"
    return "OK", ""


Outcome = tuple[int, str, str, str, float]  # (index, kind, status, detail, time.monotonic() at its end)


async def _run(address: str, specs: list[Spec], concurrency: int, vocab_size: int, max_model_len: int,
               conn: Connection) -> list[Outcome]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerateServiceStub(channel)
        slots = asyncio.Semaphore(concurrency)
        done = 0

        async def one(spec: Spec) -> Outcome:
            nonlocal done
            async with slots:
                status, detail = await send(stub, spec, vocab_size, max_model_len)
            done += 1
            if done % PROGRESS_EVERY == 0:
                conn.send(("progress", done))
            return spec.index, spec.kind, status, detail[:300], time.monotonic()

        return await asyncio.gather(*(one(s) for s in specs))


def run_client(address: str, warmup: list[Spec], specs: list[Spec], concurrency: int, vocab_size: int,
               max_model_len: int, conn: Connection) -> None:
    """A client process: the warm-up requests, then ("warm",), ("progress", n) as requests end, and finally
    ("outcomes", [Outcome])."""
    asyncio.run(_run(address, warmup, concurrency, vocab_size, max_model_len, conn))
    conn.send(("warm",))
    outcomes = asyncio.run(_run(address, specs, concurrency, vocab_size, max_model_len, conn))
    conn.send(("outcomes", outcomes))
