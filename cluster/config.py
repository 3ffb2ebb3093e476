"""Engine configuration: frozen, validated at construction; derived values are computed, not stored."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """The engine's tunables, shared by every worker of a cluster (the `engine:` section of a cluster YAML).

    `num_kv_blocks=None` sizes the cache from `kv_cache_memory_gb` (CPU) or, on CUDA, from the device's total
    memory times `gpu_memory_utilization` (see `EngineConfig.kv_cache_budget`).
    """

    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 1.0
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = False  # mix prompt chunks into decode steps (colocated serving)
    enforce_eager: bool = False  # CUDA only: no CUDA graphs for decode

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if not (0.0 < self.gpu_memory_utilization <= 1.0):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be positive, got {self.kv_cache_memory_gb}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    def options(self) -> dict[str, object]:
        """The tunables alone (what `EngineConfig(model=..., **options)` takes)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(EngineOptions)}


@dataclass(frozen=True, kw_only=True)
class EngineConfig(EngineOptions):
    """Everything an engine needs besides the model's own config.json: the tunables plus model, device, seed.

    `device_share` is the fraction of the device this engine owns (a fractional-GPU worker's
    `gpus_per_worker`; 1.0: the whole device), which scales its CUDA memory budget.
    """

    model: str
    device: str = "cpu"
    seed: int = 0
    device_share: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise ValueError("model directory must be given")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if not (0.0 < self.device_share <= 1.0):
            raise ValueError(f"device_share must be in (0, 1], got {self.device_share}")

    def kv_cache_budget(self, total_bytes: int, free_bytes: int, held_bytes: int) -> int:
        """Bytes the KV cache may take on a CUDA device of `total_bytes`, `free_bytes` of them free now, after
        this engine already holds `held_bytes` (its weights): this engine's share of the device,
        total x gpu_memory_utilization x device_share, minus what it holds, capped by what is free less the
        headroom its share keeps for activations. The share is of the total, not of what is free, so engines
        that start on one device at the same time never over-commit it. ValueError when nothing is left."""
        share = total_bytes * self.device_share
        budget = share * self.gpu_memory_utilization - held_bytes
        cap = free_bytes - share * (1.0 - self.gpu_memory_utilization)
        if min(budget, cap) <= 0:
            gib = 2.0**30
            raise ValueError(
                f"no memory left for the KV cache: {total_bytes / gib:.2f} GiB device x gpu_memory_utilization "
                f"{self.gpu_memory_utilization} x device share {self.device_share} = "
                f"{share * self.gpu_memory_utilization / gib:.2f} GiB, of which this engine already holds "
                f"{held_bytes / gib:.2f} GiB, with {free_bytes / gib:.2f} GiB free on the device; raise "
                "gpu_memory_utilization or gpus_per_worker, or serve a smaller model")
        return int(min(budget, cap))

    @property
    def torch_dtype_name(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if self.device == "cpu" else "bfloat16"
