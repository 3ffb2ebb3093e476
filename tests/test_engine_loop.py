"""The engine thread's loop: it waits for calls only when it has nothing it can run."""

from __future__ import annotations

import threading

from cluster.config import EngineConfig
from cluster.engine import LLMEngine, SamplingParams
from cluster.worker.engine_loop import EngineLoop


def test_chunked_prompt_runs_its_chunks_back_to_back(tiny_llama):
    """A step of prompt chunks yields no output; the loop must not take that for "nothing ran" and sleep
    (it used to wait 50 ms for calls after every chunk of a prompt on an idle worker)."""
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=64, block_size=8, max_num_seqs=4,
                                    max_num_batched_tokens=32, enable_chunked_prefill=True))
    loop = EngineLoop(engine)
    waits: list[tuple[bool, bool]] = []  # (blocked for calls, the engine had work) before each step
    drain = loop._drain_calls

    def recording_drain(block: bool) -> None:
        waits.append((block, engine.has_unfinished()))
        drain(block)

    loop._drain_calls = recording_drain  # type: ignore[method-assign]
    done = threading.Event()
    try:
        loop.watch("r", lambda out, _t: done.set() if isinstance(out, BaseException) or out.finished else None)
        loop.call(lambda e: e.add_request("r", [3 + j % 300 for j in range(150)],
                                          SamplingParams(max_tokens=3, ignore_eos=True))).result(10)
        assert done.wait(30)
    finally:
        loop.stop()
    busy = [block for block, had_work in waits if had_work]
    assert len(busy) >= 5  # 150 prompt tokens in 32-token chunks, then decodes
    assert not any(busy), "the loop blocked for calls while it had runnable work"
