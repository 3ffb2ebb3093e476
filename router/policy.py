"""Prompt placement policies, by name: round_robin, least_loaded (Redis load), prefix_aware.

A policy orders the live workers that run prompts (its `role`: the prefill pool, or in colocated mode the
colocated workers) by preference; the orchestrator tries them in that order (the next one only when the
first is unreachable). Decode placement is not a policy: the registry's atomic `reserve_decode` picks the
decode worker with the most KV headroom, so concurrent routers never over-commit one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol

from cluster.registry import AsyncRegistry, WorkerInfo, WorkerLoad

Worker = tuple[WorkerInfo, WorkerLoad]


def load_score(load: WorkerLoad) -> int:
    return load.num_waiting + load.num_running


class PrefillPolicy(Protocol):
    name: str

    async def order(self, workers: Sequence[Worker], block_hashes: Sequence[str]) -> list[WorkerInfo]:
        """The workers (non-empty input) in the order to try them."""
        ...


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    async def order(self, workers: Sequence[Worker], block_hashes: Sequence[str]) -> list[WorkerInfo]:
        infos = sorted((w[0] for w in workers), key=lambda i: i.worker_id)
        k = next(self._counter) % len(infos)
        return infos[k:] + infos[:k]


class LeastLoaded:
    """Lowest registry load first: max(waiting + running from the heartbeat, router-side inflight)."""

    name = "least_loaded"

    def __init__(self, registry: AsyncRegistry, role: str = "prefill") -> None:
        self._registry = registry
        self._role = role

    async def order(self, workers: Sequence[Worker], block_hashes: Sequence[str]) -> list[WorkerInfo]:
        first = await self._registry.pick_prefill_least_loaded(role=self._role)
        rest = sorted(workers, key=lambda w: (load_score(w[1]), w[0].worker_id))
        return _first(first, [w[0] for w in rest])


class PrefixAware:
    """The worker caching the longest prefix of the prompt's block hashes, unless its load exceeds the
    least loaded worker's by more than `load_slack`; otherwise (or with no cached prefix) least loaded."""

    name = "prefix_aware"

    def __init__(self, registry: AsyncRegistry, load_slack: int, role: str = "prefill") -> None:
        self._registry = registry
        self._slack = load_slack
        self._role = role
        self._fallback = LeastLoaded(registry, role)

    async def order(self, workers: Sequence[Worker], block_hashes: Sequence[str]) -> list[WorkerInfo]:
        ordered = await self._fallback.order(workers, block_hashes)
        best, matched = await self._registry.best_prefix_worker(block_hashes, role=self._role)
        if best is None or matched == 0:
            return ordered
        loads = {w[0].worker_id: load_score(w[1]) for w in workers}
        if best not in loads or loads[best] > min(loads.values()) + self._slack:
            return ordered
        return _first(best, ordered)


def _first(worker_id: str | None, infos: list[WorkerInfo]) -> list[WorkerInfo]:
    """`infos` with the named worker moved to the front (unchanged if absent)."""
    head = [i for i in infos if i.worker_id == worker_id]
    return head + [i for i in infos if i.worker_id != worker_id]


def make_policy(name: str, registry: AsyncRegistry, prefix_load_slack: int = 8,
                role: str = "prefill") -> PrefillPolicy:
    """The policy `name`, placing prompts on workers of `role` ("prefill", or "colocated")."""
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded(registry, role)
    if name == "prefix_aware":
        return PrefixAware(registry, prefix_load_slack, role)
    raise ValueError(f"unknown policy {name!r}; choose round_robin, least_loaded or prefix_aware")
