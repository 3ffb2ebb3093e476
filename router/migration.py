"""When an attempt of a request fails, whether another attempt continues it, and from where.

An attempt is one placement of a request: a decode reservation, a prefill that pushes the KV, a decode that
streams (colocated: one Generate). Two failures are worth another attempt, which prefills the prompt plus
every token the client has been sent (`Progress.sent`, counted as output by the workers) so the client's
stream goes on with no token lost or repeated:
- the worker streaming the tokens is lost (its Attach stream broke, Attach / Decode answered UNAVAILABLE, or
  it hangs: no token of the request within `decode_first_token_timeout_s` / `decode_chunk_timeout_s` while its
  stream stays up): a migration, up to `migration_limit` per request, never onto a lost worker;
- the KV handoff failed (Prefill or Decode answered ABORTED or DEADLINE_EXCEEDED: the push failed, or the
  KV did not arrive within the lease) under `kv_failure_policy: recompute`: once per request, with the failed
  attempt's prefill workers tried last. An unreachable prefill worker is not a handoff failure: placement
  tries the next one within the attempt (`max_prefill_attempts`), under either policy.
A request whose client deadline has passed, or that fails otherwise, ends with the attempt's own status.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

from router.config import RouterConfig
from router.errors import RouterError
from router.worker_sessions import StreamStalled

WORKER_LOST = "worker_lost"
KV_HANDOFF = "kv_handoff"
MAX_KV_RECOMPUTES = 1  # a second failed handoff of one request points at the cluster, not at bad luck
_HANDOFF_CODES = (grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED)


class AttemptFailed(Exception):
    """An attempt failed in a way another attempt may mend; `error` is the status if none may."""

    def __init__(self, error: RouterError, cause: str, workers: Iterable[str]) -> None:
        super().__init__(error.reason)
        self.error = error
        self.cause = cause  # WORKER_LOST | KV_HANDOFF
        self.workers = frozenset(workers)  # the lost worker, or the prefill workers of the failed handoff


def stream_failure(error: RouterError, worker_id: str) -> RouterError | AttemptFailed:
    """A failure of the worker streaming a request's tokens: an UNAVAILABLE one, or a stalled stream, means the
    worker is lost."""
    lost = error.code == grpc.StatusCode.UNAVAILABLE or isinstance(error, StreamStalled)
    return AttemptFailed(error, WORKER_LOST, [worker_id]) if lost else error


def handoff_failure(error: RouterError, prefill_workers: Iterable[str]) -> RouterError | AttemptFailed:
    """A failure of Prefill, or of Decode waiting for the KV: ABORTED and DEADLINE_EXCEEDED mean the KV did not
    make it into the reservation."""
    return AttemptFailed(error, KV_HANDOFF, prefill_workers) if error.code in _HANDOFF_CODES else error


@dataclass
class Progress:
    """One request across its attempts."""

    sent: list[int] = field(default_factory=list)  # output token ids the client has been sent
    lost: set[str] = field(default_factory=set)  # workers lost mid-stream: never tried again for this request
    failed: set[str] = field(default_factory=set)  # prefill workers of a failed handoff: tried last
    migrations: int = 0
    recomputes: int = 0

    def may_continue(self, failure: AttemptFailed, config: RouterConfig, live: Iterable[str],
                     time_left: float | None) -> bool:
        """Record `failure`; whether another attempt may follow. `live`: the ids of the live workers of the role
        that streams (decode, or colocated); `time_left`: the client's (None: no deadline)."""
        if time_left is not None and time_left <= 0:
            return False
        if failure.cause == WORKER_LOST:
            self.lost |= failure.workers
            if self.migrations >= config.migration_limit or not set(live) - self.lost:
                return False
            self.migrations += 1
            return True
        self.failed |= failure.workers
        if config.kv_failure_policy != "recompute" or self.recomputes >= MAX_KV_RECOMPUTES:
            return False
        self.recomputes += 1
        return True

    @property
    def avoid(self) -> set[str]:
        """Workers a new attempt tries last (placement may still need them)."""
        return self.lost | self.failed
