"""Prompt placement policies, by name: least_loaded, round_robin, prefix_aware.

A policy orders the live workers that run prompts (the prefill pool, or in colocated mode the colocated
workers) by preference; the orchestrator tries them in that order (the next one only when the first is
unreachable). The ordering itself runs inside the registry's one placement call (`AsyncRegistry.place`,
rules documented in `cluster.registry`), together with the decode pick and the load counting, so a
policy here only names its rule and parameters. Decode placement is not a policy: `place` picks the
decode worker with the most KV headroom, so concurrent routers never over-commit one.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.registry import RULES


@dataclass(frozen=True)
class PrefillPolicy:
    """`name`: the registry rule. `load_slack` (prefix_aware): keep a prompt on the worker caching its
    longest prefix unless that worker's load exceeds the least loaded one's by more than this."""

    name: str
    load_slack: int = 0

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise ValueError(f"unknown policy {self.name!r}; choose one of {', '.join(RULES)}")
        if self.load_slack < 0:
            raise ValueError(f"load_slack must be >= 0, got {self.load_slack}")

    @property
    def uses_prefixes(self) -> bool:
        """Whether placement reads the prompt's block hashes (nothing else computes them)."""
        return self.name == "prefix_aware"


def make_policy(name: str, prefix_load_slack: int = 8) -> PrefillPolicy:
    """The policy `name`; `prefix_load_slack` applies to prefix_aware only."""
    return PrefillPolicy(name, prefix_load_slack if name == "prefix_aware" else 0)
