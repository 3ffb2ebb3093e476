"""Batched token sampling on the device: greedy, temperature, top-k, top-p, per-request seeds.

Randomness comes from a counter-based hash of (request seed, output position, token id), turned into
exponential noise for the Gumbel/exponential-race trick: `argmax(p / E)` samples from `p`. So a seeded
request draws the same tokens whatever else is in the batch, and nothing syncs with the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B


@dataclass
class SamplingTensors:
    """Per-row sampling parameters, already on the logits' device."""

    temperature: torch.Tensor | None  # [B] float32, 0 = greedy (None when every row is greedy)
    top_k: torch.Tensor  # [B] int64, vocab size = off
    top_p: torch.Tensor | None  # [B] float32
    seed: torch.Tensor  # [B] int64 (31 bits used per half)
    position: torch.Tensor  # [B] int64: index of the output token being drawn
    any_random: bool  # False: skip the noise path entirely
    needs_filter: bool  # some row has top-k or top-p


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Integer finalizer on values < 2**32, kept in int64 without overflow."""
    x = x ^ (x >> 16)
    x = (x * _MIX) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MIX) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seed: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, V] uniforms in (0, 1), a pure function of (seed, position, token id)."""
    token = torch.arange(vocab, device=seed.device, dtype=torch.int64)[None, :]
    lo, hi = seed & _MASK32, (seed >> 32) & _MASK32
    h = _mix32(lo[:, None] ^ _mix32(hi[:, None] ^ _mix32((position[:, None] * 0x9E37) & _MASK32)))
    h = _mix32(h ^ token)
    return ((h >> 8).to(torch.float32) + 0.5) / float(1 << 24)


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus with -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
    sorted_logits = sorted_logits.masked_fill((before > top_p[:, None]) & (ranks > 0), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (int64)."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if not t.any_random or t.temperature is None:
        return greedy
    scaled = logits / t.temperature.clamp(min=1e-6)[:, None]
    if t.needs_filter and t.top_p is not None:
        scaled = _filter(scaled, t.top_k, t.top_p)
    probs = scaled.softmax(dim=-1)
    noise = -torch.log(uniform_noise(t.seed, t.position, logits.shape[-1]))
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(t.temperature == 0, greedy, sampled)


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities (of the unscaled model distribution) of the chosen tokens and the top k."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)
    top_vals, top_ids = logp.topk(max(k, 1), dim=-1)
    return chosen, top_vals, top_ids
