"""KVHandoff on a real BlockManager: held prefills, reservations and layer sinks free every block they take."""

from __future__ import annotations

import pytest

from cluster.engine.block_manager import BlockManager
from cluster.engine.kv_handoff import KVHandoff
from cluster.engine.outputs import FINISH_ABORT, FINISH_LENGTH, FINISH_PREFILLED, StepOutput
from cluster.engine.scheduler import ScheduledBatch
from cluster.engine.sequence import Sequence
from cluster.sampling_params import SamplingParams


def make(num_blocks: int = 9) -> tuple[BlockManager, KVHandoff]:
    bm = BlockManager(num_blocks, block_size=4)
    return bm, KVHandoff(bm)


def prefilled_seq(bm: BlockManager, rid: str, n_tokens: int, reason: str | None = FINISH_PREFILLED) -> Sequence:
    seq = Sequence(rid, list(range(3, 3 + n_tokens)), n_tokens, SamplingParams(), seed=0, prefill_only=True)
    bm.allocate(seq)
    seq.num_computed_tokens = n_tokens
    seq.finish_reason = reason
    return seq


def check(bm: BlockManager, handoff: KVHandoff, *others: Sequence) -> None:
    bm.check_invariants([s.block_table for s in others] + handoff.block_tables())


def test_held_prefill_keeps_its_blocks_until_released():
    bm, handoff = make()
    seq = prefilled_seq(bm, "p", 10)
    out = StepOutput("p", [7], "", finished=True, finish_reason=FINISH_PREFILLED)
    assert handoff.on_finish(seq, out)
    assert out.kv_block_ids == seq.block_table and len(seq.block_table) == 3
    assert handoff.prefilled_blocks("p") == (seq.block_table, 10)
    assert handoff.holds("p") and handoff.num_prefilled == 1
    check(bm, handoff)
    assert handoff.release_prefilled("p") and not handoff.release_prefilled("p")
    assert not handoff.holds("p") and bm.num_free_blocks == bm.num_usable_blocks
    check(bm, handoff)


def test_finish_without_a_held_prefill():
    bm, handoff = make()
    plain = Sequence("d", [3, 4], 2, SamplingParams(), seed=0)
    plain.finish_reason = FINISH_LENGTH
    assert not handoff.on_finish(plain, StepOutput("d", [5], "", finished=True))
    aborted = prefilled_seq(bm, "a", 5, FINISH_ABORT)
    assert not handoff.on_finish(aborted, StepOutput("a", [], "", finished=True))
    stopped = prefilled_seq(bm, "s", 5, FINISH_LENGTH)  # prefill-only, ended otherwise: held, ids not handed out
    out = StepOutput("s", [5], "", finished=True)
    assert handoff.on_finish(stopped, out) and out.kv_block_ids is None
    check(bm, handoff, aborted)


def test_reserve_claim_and_release():
    bm, handoff = make()
    assert handoff.reserve("big", 4 * 9) is None
    blocks = handoff.reserve("r", 9)
    assert blocks is not None and len(blocks) == 3 and handoff.num_reserved_blocks == 3
    assert handoff.reservations == {"r": blocks}
    with pytest.raises(ValueError, match="already in use"):
        handoff.reserve("r", 1)
    check(bm, handoff)
    with handoff.claim("r", 12) as claimed:
        assert claimed == blocks
    assert not handoff.holds("r") and bm.num_free_blocks == bm.num_usable_blocks - 3  # now the caller's
    bm.release_blocks(claimed)
    assert handoff.reserve("x", 1) is not None and handoff.release_reservation("x")
    assert not handoff.release_reservation("x") and bm.num_free_blocks == bm.num_usable_blocks


@pytest.mark.parametrize(("rid", "n_tokens", "error"), [("other", 8, "no reservation"), ("r", 9, "needs"),
                                                        ("r", 8, "boom")])
def test_failed_claim_frees_the_reservation(rid, n_tokens, error):
    bm, handoff = make()
    handoff.reserve("r", 8)
    with pytest.raises(ValueError, match=error), handoff.claim(rid, n_tokens):
        raise ValueError("boom")
    kept = rid != "r"  # a claim of another id leaves this reservation alone
    assert handoff.holds("r") == kept and bm.num_free_blocks == bm.num_usable_blocks - (2 if kept else 0)
    check(bm, handoff)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[list[int], int]] = []

    def layers_ready(self, src_block_ids: list[int], upto: int) -> None:
        self.calls.append((list(src_block_ids), upto))


def test_layer_hook_only_for_the_forward_that_completes_a_streamed_prompt():
    bm, handoff = make()
    seq = Sequence("p", list(range(3, 13)), 10, SamplingParams(), seed=0, prefill_only=True)
    other = Sequence("q", list(range(3, 9)), 6, SamplingParams(), seed=0, prefill_only=True)
    bm.allocate(seq)
    bm.allocate(other)
    assert handoff.layer_hook(ScheduledBatch([seq], [10])) is None  # nothing streams
    sink = Recorder()
    handoff.stream("p", sink)
    assert handoff.layer_hook(ScheduledBatch([seq, other], [4, 6])) is None  # a first chunk of "p"
    hook = handoff.layer_hook(ScheduledBatch([seq, other], [10, 6]))
    assert hook is not None
    hook(0)
    hook(1)
    assert sink.calls == [(seq.block_table, 1), (seq.block_table, 2)]
    assert handoff.abort("p") is False  # the sink was all it held
    assert handoff.layer_hook(ScheduledBatch([seq], [10])) is None


def test_abort_frees_whatever_is_held():
    bm, handoff = make()
    handoff.on_finish(prefilled_seq(bm, "p", 6), StepOutput("p", [1], "", finished=True))
    handoff.reserve("r", 5)
    assert handoff.abort("p") and handoff.abort("r") and not handoff.abort("r")
    assert bm.num_free_blocks == bm.num_usable_blocks and handoff.block_tables() == []
