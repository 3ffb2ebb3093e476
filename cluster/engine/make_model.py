"""Write random-weight Hugging Face checkpoints (Llama / Qwen2 / Mistral) with a locally trained tokenizer.

Weights are drawn tensor by tensor from a generator seeded with (seed, tensor name), so a checkpoint is
deterministic for a given (arch, shape, seed, dtype, device) and independent of write order. CPU and CUDA
generators produce different values for the same seed: a model made with `device="cuda"` differs from one
made on the CPU. Nothing is downloaded: the byte-level BPE tokenizer is trained locally (`builtin_tokenizer`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cluster.engine.builtin_tokenizer import BOS, EOS, TOKENIZER_VOCAB, build_tokenizer  # noqa: F401 (re-export)
from cluster.tokenizer import CHAT_TEMPLATE

ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_SHARD_BYTES = 2 * 1024**3
MARKER = "pdserve_model.json"  # written into every directory this module fills


@dataclass(frozen=True)
class Shape:
    """Dimensions of a named model shape; `vocab_size=None` means the tokenizer's size."""

    archs: tuple[str, ...]
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int | None
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-arch field overrides


def _llama3(factor: float, original: int) -> dict[str, Any]:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": original}


SHAPES: dict[str, Shape] = {
    # initializer_range 0.07 keeps the tiny model's logits spread out (clear greedy margins).
    "tiny": Shape(tuple(ARCHS), 128, 4, 4, 2, 256, None, 4096, 10000.0, initializer_range=0.07, overrides={
        "llama": {"rope_theta": 500000.0, "rope_scaling": _llama3(8.0, 1024)},
        "qwen2": {"rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}}),
    "llama-3.2-1b": Shape(("llama",), 2048, 16, 32, 8, 8192, 128256, 131072, 500000.0,
                          tie_word_embeddings=True, rope_scaling=_llama3(32.0, 8192)),
    "llama-3.1-8b": Shape(("llama",), 4096, 32, 32, 8, 14336, 128256, 131072, 500000.0,
                          rope_scaling=_llama3(8.0, 8192)),
    "qwen2.5-0.5b": Shape(("qwen2",), 896, 24, 14, 2, 4864, 151936, 32768, 1e6, rms_norm_eps=1e-6,
                          tie_word_embeddings=True),
    "qwen2.5-1.5b": Shape(("qwen2",), 1536, 28, 12, 2, 8960, 151936, 32768, 1e6, rms_norm_eps=1e-6,
                          tie_word_embeddings=True),
}

def _check(arch: str, shape: str, dtype: str) -> Shape:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
    if arch not in SHAPES[shape].archs:
        combos = ", ".join(f"{a}/{s}" for s, sh in SHAPES.items() for a in sh.archs)
        raise ValueError(f"shape {shape!r} is not available for arch {arch!r}; valid arch/shape: {combos}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return dataclasses.replace(SHAPES[shape], **SHAPES[shape].overrides.get(arch, {}))


def build_config(arch: str = "llama", shape: str = "tiny", dtype: str = "float32",
                 bos_token_id: int = TOKENIZER_VOCAB - 2, eos_token_id: int = TOKENIZER_VOCAB - 1) -> Any:
    """The transformers config for `arch` with `shape` (no weights are allocated)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    s = _check(arch, shape, dtype)
    kwargs: dict[str, Any] = dict(
        vocab_size=s.vocab_size or TOKENIZER_VOCAB, hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size, num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
        head_dim=s.hidden_size // s.num_heads, max_position_embeddings=s.max_position_embeddings,
        rms_norm_eps=s.rms_norm_eps, initializer_range=s.initializer_range,
        tie_word_embeddings=s.tie_word_embeddings, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        rope_theta=s.rope_theta,  # legacy rope kwargs: transformers 5 folds them into `rope_parameters`
    )
    if s.rope_scaling:
        kwargs["rope_scaling"] = dict(s.rope_scaling)
    if arch == "llama":
        cls: Any = LlamaConfig
    elif arch == "qwen2":
        cls = Qwen2Config
        del kwargs["head_dim"]  # Qwen2Config derives it
        kwargs.update(use_sliding_window=False, sliding_window=None, max_window_layers=s.num_layers)
    else:
        cls = MistralConfig
        kwargs.update(sliding_window=None)
    config = cls(architectures=[ARCHS[arch]], **kwargs)
    config.dtype = dtype
    return config


def param_shapes(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(HF parameter name, shape) for every tensor written for `config`, in file order."""
    h, d, i = config.hidden_size, config.hidden_size // config.num_attention_heads, config.intermediate_size
    nq, nkv = config.num_attention_heads * d, config.num_key_value_heads * d
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (config.vocab_size, h))]
    bias = config.architectures[0] == "Qwen2ForCausalLM"
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,))]
        for proj, rows in (("q", nq), ("k", nkv), ("v", nkv)):
            out += [(f"{p}self_attn.{proj}_proj.weight", (rows, h))]
            out += [(f"{p}self_attn.{proj}_proj.bias", (rows,))] if bias else []
        out += [(p + "self_attn.o_proj.weight", (h, nq)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    out += [("model.norm.weight", (h,))]
    return out if config.tie_word_embeddings else out + [("lm_head.weight", (config.vocab_size, h))]


def _tensor(name: str, shape: tuple[int, ...], std: float, seed: int, dtype: torch.dtype,
            device: str) -> torch.Tensor:
    """One parameter from a generator seeded by (seed, name): norms ~ 1 + noise, everything else N(0, std)."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    gen = torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    t = t.mul_(0.1).add_(1.0) if name.endswith("norm.weight") else t.mul_(std)
    return t.to(dtype).cpu().contiguous()


def _prepare_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file() and not overwrite:
            raise ValueError(f"{out} is not empty and holds no pdserve-made model; pass overwrite=True "
                             "(--overwrite) to write into it anyway")
        for old in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json", out / "config.json"]:
            old.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _write_weights(out: Path, config: Any, seed: int, dtype: torch.dtype, device: str, desc: str) -> int:
    """Generate and save the weights shard by shard (at most MAX_SHARD_BYTES each); return the param count."""
    from tqdm import tqdm

    params = param_shapes(config)
    size = {name: torch.Size(shp).numel() * dtype.itemsize for name, shp in params}
    shards: list[list[str]] = [[]]
    for name, _ in params:
        if shards[-1] and sum(size[n] for n in shards[-1]) + size[name] > MAX_SHARD_BYTES:
            shards.append([])
        shards[-1].append(name)
    total, shape_of, weight_map = sum(size.values()), dict(params), {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=total < 256 * 1024**2) as bar:
        for k, names in enumerate(shards, 1):
            n = len(shards)
            fname = f"model-{k:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
            tensors = {}
            for name in names:
                tensors[name] = _tensor(name, shape_of[name], config.initializer_range, seed, dtype, device)
                weight_map[name] = fname
                bar.update(size[name])
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
            (out / fname).chmod(0o644)
            del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total // dtype.itemsize


def make_model(out_dir: str | Path, arch: str = "llama", shape: str = "tiny", seed: int = 0,
               dtype: str = "float32", device: str = "cpu", overwrite: bool = False) -> Path:
    """Write a random-weight HF checkpoint (config, weights, generation config, tokenizer); return its dir.

    Refuses a non-empty `out_dir` unless it holds a model made here or `overwrite` is set.
    """
    from transformers import GenerationConfig

    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    s = _check(arch, shape, dtype)
    out = Path(out_dir)
    _prepare_dir(out, overwrite)
    info = {"arch": arch, "shape": shape, "seed": seed, "dtype": dtype, "device": device, "complete": False}
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")

    tok = build_tokenizer(s.max_position_embeddings)
    config = build_config(arch, shape, dtype, tok.bos_token_id, tok.eos_token_id)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(out)
    tok.save_pretrained(out)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    # Loadable by transformers 4.x; no unk token, else transformers 5 adds one past the vocab for qwen2.
    tok_cfg.update(tokenizer_class="PreTrainedTokenizerFast", unk_token=None, chat_template=CHAT_TEMPLATE)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")

    num_params = _write_weights(out, config, seed, DTYPES[dtype], device, f"{arch}/{shape}")
    config.save_pretrained(out)  # last: config.json exists only once the weights are complete
    info.update(complete=True, num_params=num_params)
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return out


def add_make_model_args(parser: argparse.ArgumentParser) -> None:
    """Add the `make-model` arguments: DIR, --arch, --shape, --seed, --dtype, --device, --overwrite."""
    parser.add_argument("out_dir", metavar="DIR", help="directory to write the checkpoint into")
    parser.add_argument("--arch", choices=list(ARCHS), default=None,
                        help="model architecture (default: llama, or the shape's own for real shapes)")
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny", help="named model shape")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (same seed, same bytes)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weight dtype")
    parser.add_argument("--device", default="cpu",
                        help="where to generate weights: cpu or cuda (values differ between the two)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty directory anyway")


def run_make_model(args: argparse.Namespace) -> int:
    """CLI handler for `pdserve make-model`: write the model and print what was written."""
    start = time.perf_counter()
    arch = args.arch or (SHAPES[args.shape].archs[0] if args.shape in SHAPES else "llama")
    try:
        out = make_model(args.out_dir, arch=arch, shape=args.shape, seed=args.seed, dtype=args.dtype,
                         device=args.device, overwrite=getattr(args, "overwrite", False))
    except ValueError as exc:
        print(f"make-model: error: {exc}", file=sys.stderr)
        return 2
    info = json.loads((out / MARKER).read_text())
    print(f"wrote {arch}/{args.shape} (seed {args.seed}, {args.dtype}, {info['num_params']:,} params) "
          f"to {out} in {time.perf_counter() - start:.1f}s:")
    for f in sorted(out.iterdir()):
        print(f"  {f.name:40s} {f.stat().st_size:>14,d} bytes")
    return 0
