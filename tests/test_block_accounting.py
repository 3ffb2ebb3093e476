"""Property test: any interleaving of submit / abort / step / reserve / release ends with every block free."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.config import EngineConfig
from cluster.engine import LLMEngine, SamplingParams

ops = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(1, 60), st.integers(1, 12), st.booleans()),
        st.tuples(st.just("abort"), st.integers(0, 30)),
        st.tuples(st.just("step"), st.integers(1, 4)),
        st.tuples(st.just("reserve"), st.integers(1, 80)),
        st.tuples(st.just("import"), st.integers(0, 30)),
        st.tuples(st.just("release"), st.integers(0, 30)),
    ),
    max_size=40,
)


@pytest.fixture(scope="module")
def make_engine(tiny_llama):
    def make(chunked: bool, prefix_caching: bool = True) -> LLMEngine:  # fresh per example: no leaks between
        return LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=20, block_size=8, max_num_seqs=4,
                                      max_num_batched_tokens=32 if chunked else 128,
                                      enable_chunked_prefill=chunked, enable_prefix_caching=prefix_caching))

    return make


@pytest.mark.parametrize(("chunked", "prefix_caching"), [(False, True), (True, True), (False, False)])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_random_operations_free_every_block(make_engine, chunked, prefix_caching, ops):
    """(Without a prefix cache, decode growth takes the lowest free id through a lazily cleaned heap.)"""
    engine = make_engine(chunked, prefix_caching)
    ids: list[str] = []
    for n, op in enumerate(ops):
        kind = op[0]
        if kind == "submit":
            _, length, max_tokens, prefill_only = op
            rid = f"r{n}"
            engine.add_request(rid, [(7 * i + length) % 500 + 3 for i in range(length)],
                               SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=n, ignore_eos=True),
                               prefill_only=prefill_only)
            ids.append(rid)
        elif kind == "reserve":
            rid = f"v{n}"
            if engine.reserve(rid, op[1]) is not None:
                ids.append(rid)
        elif kind == "import" and ids:
            rid = ids[op[1] % len(ids)]
            if rid in engine._reservations:
                n_tokens = len(engine._reservations[rid]) * 8
                engine.add_prefilled_request(rid, [5] * n_tokens, 6, SamplingParams(max_tokens=3, ignore_eos=True))
        elif kind in ("abort", "release") and ids:
            rid = ids[op[1] % len(ids)]
            if kind == "abort":
                engine.abort(rid)
            else:
                engine.release_prefilled(rid)
        elif kind == "step":
            for _ in range(op[1]):
                engine.step()
        engine.check_block_accounting()
    # Held prefills and unused reservations keep their blocks until released (in a worker: after the KV send,
    # or when the lease ends); release them so waiting requests can finish.
    for rid in ids:
        engine.release_prefilled(rid)
        engine.release_reservation(rid)
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        engine.step()
        for rid in ids:  # as a prefill worker does once the KV is sent
            engine.release_prefilled(rid)
        engine.check_block_accounting()
    assert not engine.has_unfinished()
    for rid in ids:
        engine.abort(rid)
    engine.check_block_accounting()
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_reserve_from_another_thread_while_steps_run(make_engine):
    """A decode worker reserves from its gRPC thread while the engine thread steps (no wait for the step):
    the accounting holds after every step and every block comes back."""
    import time

    from cluster.worker.engine_loop import EngineLoop

    engine = make_engine(True)
    loop = EngineLoop(engine)
    try:
        finished = []
        for i in range(6):
            rid = f"g{i}"
            loop.watch(rid, lambda out, _t: finished.append(out) if not isinstance(out, BaseException)
                       and out.finished else None)
            loop.call(lambda e, rid=rid, i=i: e.add_request(
                rid, [3 + (i * 7 + j) % 400 for j in range(20 + i)],
                SamplingParams(max_tokens=12, ignore_eos=True))).result(10)
        held: list[str] = []
        for n in range(400):  # reserve / release as fast as possible while the loop steps
            if engine.reserve(f"v{n}", 1 + n % 30) is not None:
                held.append(f"v{n}")
            if len(held) > 2:
                assert engine.release_reservation(held.pop(0))
        for rid in held:
            engine.release_reservation(rid)
        for _ in range(200):
            if len(finished) == 6:
                break
            time.sleep(0.05)
        assert len(finished) == 6
        loop.call(lambda e: e.check_block_accounting()).result(10)
        stats = loop.call(lambda e: e.stats()).result(10)
        assert stats.num_free_blocks == stats.num_total_blocks
    finally:
        loop.stop()
