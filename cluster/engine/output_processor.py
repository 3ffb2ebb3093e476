"""Turns sampled tokens into request progress: stop conditions, incremental text, logprobs."""

from __future__ import annotations

from cluster.engine.outputs import FINISH_LENGTH, FINISH_PREFILLED, FINISH_STOP, StepOutput
from cluster.engine.sequence import Sequence
from cluster.tokenizer import IncrementalDetokenizer, TextTokenizer, find_stop


class OutputProcessor:
    """Applies EOS / stop ids / stop strings / max_tokens / max_model_len to each new token.

    While a request runs, text that could be the start of a stop string is held back, so a stream never
    shows characters that a stop string later removes.
    """

    def __init__(self, tokenizer: TextTokenizer, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def attach(self, seq: Sequence) -> None:
        """Give `seq` its detokenizer. Output tokens it already has (a request continued here after another
        worker failed) were sent with their text from there: the detokenizer resumes after them, and the text
        they released counts as emitted, so stop strings and held-back text carry on across the move."""
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer)
        if seq.num_output_tokens:
            seq.detokenizer.push(seq.output_token_ids)
            seq.text_emitted = self._releasable(seq, finished=False)

    def seed_first_token(self, seq: Sequence, token: int) -> None:
        """A decode-side sequence goes on from the token its prefill worker sampled: count it as output (its
        text goes out with the sequence's next delta)."""
        assert seq.detokenizer is not None
        seq.token_ids.append(token)
        seq.detokenizer.push([token])

    @staticmethod
    def _releasable(seq: Sequence, finished: bool) -> int:
        """How much of the detokenized text may go out: all of it once finished, else all but a tail that
        could still become the start of a stop string."""
        assert seq.detokenizer is not None
        end = len(seq.detokenizer.text)
        if not finished and seq.params.stop:
            end = max(seq.text_emitted, end - (max(len(s) for s in seq.params.stop) - 1))
        return end

    def append_token(self, seq: Sequence, token: int, logprobs: dict[int, float] | None) -> StepOutput:
        seq.token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        detok = seq.detokenizer
        assert detok is not None
        new_text = detok.push([token])
        params = seq.params
        reason: str | None = None
        stop_at: int | None = None
        if params.stop and new_text:
            stop_at = find_stop(detok.text, len(new_text), params.stop)
            if stop_at is not None:
                reason = FINISH_STOP
        if reason is None:
            if (not params.ignore_eos and token in self.eos_token_ids) or token in params.stop_token_ids:
                reason = FINISH_STOP
            elif seq.num_output_tokens >= params.max_tokens or len(seq) >= self.max_model_len:
                reason = FINISH_LENGTH
        if reason is None and seq.prefill_only:
            reason = FINISH_PREFILLED
        finished = reason is not None
        seq.finish_reason = reason
        # Text to release now: up to the stop string, or everything on finish, else hold back a possible
        # stop-string prefix.
        end = stop_at if stop_at is not None else self._releasable(seq, finished)
        delta = detok.text[seq.text_emitted:end]
        seq.text_emitted = max(seq.text_emitted, end)
        return StepOutput(
            request_id=seq.request_id,
            new_token_ids=[token],
            text_delta=delta,
            finished=finished,
            finish_reason=reason,
            logprobs=[logprobs] if logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens,
        )
