"""Typed view of a Hugging Face decoder config: the fields our model code needs, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters (`rope_type` 'default' or 'llama3'; others are rejected)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "llama3"):
            raise ValueError(f"unsupported rope_type {self.rope_type!r}: pdserve supports 'default' and 'llama3'")
        if self.theta <= 0:
            raise ValueError(f"rope theta must be positive, got {self.theta}")


@dataclass(frozen=True)
class ModelSpec:
    """Shape and numerics of a Llama-family decoder (Llama, Qwen2, Mistral)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    rope: RopeSpec = field(default_factory=RopeSpec)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelSpec:
        """Build from a transformers `PretrainedConfig` (v4 `rope_scaling` or v5 `rope_parameters`)."""
        archs = getattr(config, "architectures", None) or []
        if not archs:
            raise ValueError("config.json names no 'architectures'; cannot tell which model to build")
        arch = archs[0]
        rope_params = dict(getattr(config, "rope_parameters", None) or {})
        scaling = getattr(config, "rope_scaling", None) or {}
        if not rope_params:
            rope_params = dict(scaling)
            rope_params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default")) or "default"
        rope = RopeSpec(
            theta=float(rope_params.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
            rope_type=rope_type,
            factor=float(rope_params.get("factor", 1.0)),
            low_freq_factor=float(rope_params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope_params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope_params.get("original_max_position_embeddings", 8192)),
        )
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        eos = config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        window = getattr(config, "sliding_window", None) if arch == "MistralForCausalLM" else None
        if window and window < config.max_position_embeddings:
            raise ValueError(f"sliding_window={window} is not supported; pdserve attends to the full context")
        return cls(
            architecture=arch,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.rms_norm_eps),
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(getattr(config, "attention_bias", False)),
            rope=rope,
            eos_token_ids=eos_ids,
            bos_token_id=getattr(config, "bos_token_id", None),
        )
