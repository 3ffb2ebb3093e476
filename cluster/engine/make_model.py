"""Write random-weight Hugging Face checkpoints (Llama / Qwen2 / Mistral) with a locally trained tokenizer.

Weights are drawn tensor by tensor from a generator seeded with (seed, tensor name), so a checkpoint is
deterministic for a given (arch, shape, seed, dtype, device) and independent of write order. CPU and CUDA
generators produce different values for the same seed: a model made with `device="cuda"` differs from one
made on the CPU. Nothing is downloaded: the byte-level BPE tokenizer is trained on the text embedded below.
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

ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
TOKENIZER_VOCAB = 1024  # trained BPE tokens + the two special tokens
MAX_SHARD_BYTES = 2 * 1024**3
SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
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

CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
It was a bright cold day in April, and the clocks were striking thirteen. The sun rose slowly over the hills.
Once upon a time there was a little girl who lived in a village near the forest. She liked to read books.
The train to the city leaves at seven in the morning and arrives just before noon, if it is on time.
Please remember to water the plants, feed the cat, and lock the door before you leave the house tonight.
Scientists have discovered that some birds can navigate by sensing the magnetic field of the Earth.
The history of the world is the history of people who moved, traded, argued, and learned from each other.
In the small kitchen, my grandmother made bread every Sunday, and the whole street smelled of it.
Water boils at one hundred degrees Celsius at sea level, but at a lower temperature on a high mountain.
Computers store numbers in binary, using only the digits zero and one to represent every value.
A good teacher asks questions that help students think for themselves instead of giving the answer.
She opened the window and listened to the rain falling on the roof; it was calm, quiet, and soft.
What time is it? Where are you going? Why did they decide to stay? How many apples are left in the box?
He said, "I will be back in ten minutes," but he did not return until the evening had already begun.
Music can change the mood of a room in a moment, turning a dull evening into a warm celebration.
The library opens at nine o'clock and closes at six, except on holidays when it is closed all day.
Children learn languages quickly because they listen carefully, repeat often, and are not afraid to fail.
The market was full of colors: red tomatoes, yellow lemons, green peppers, and purple onions.
In 1969, people walked on the Moon for the first time, and millions watched the event on television.
Our team worked hard all year, and in the end we finished the project two weeks ahead of schedule.
Good health depends on sleep, exercise, and food; none of them alone is enough to keep you well.
If you want to understand a machine, take it apart carefully and try to put it back together again.
The ocean covers more than seventy percent of the planet, yet most of it remains unexplored.
Thank you for your letter. I am happy to hear that you are well and that your new job is going fine.
The city council voted to build a new bridge across the river, which should reduce traffic downtown.
Every language has its own way of describing time, space, color, and the relations between people.
Stars are born in clouds of gas and dust, shine for millions or billions of years, and then fade away.
The recipe calls for two cups of flour, one egg, a pinch of salt, and half a cup of warm milk.
When the storm passed, the sky cleared and a rainbow appeared over the fields behind the farmhouse.
Doctors recommend washing your hands often, especially before eating and after being in public places.
The price of the ticket is twelve dollars for adults and five dollars for children under ten years old.
Mountains, deserts, forests, and rivers shape the way people live, work, travel, and build their homes.
A software engineer writes code, tests it, fixes the bugs, and then writes more code the next day.
The museum has a large collection of paintings, statues, coins, and old maps from many countries.
The first rule of the game is simple: each player takes one card, and the highest card wins the round.
It is important to read the instructions before you begin, because mistakes are hard to undo later.
Light travels faster than sound, which is why we see the lightning before we hear the thunder.
We should plan the trip carefully: book the hotel, buy the tickets, and check the weather forecast.
The number three is odd, the number four is even, and the number seven is often called lucky.
After dinner, they walked along the beach, talking about their dreams, their work, and their families.
"""


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


def build_tokenizer(model_max_length: int = 4096) -> Any:
    """Train the built-in byte-level BPE tokenizer (deterministic) and wrap it for transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    # The pipeline transformers 5 rebuilds for model_type qwen2 (Qwen2Tokenizer): same ids for every arch.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB - 2, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    tok.add_special_tokens([BOS, EOS])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False)


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
    tok_cfg.update(tokenizer_class="PreTrainedTokenizerFast", unk_token=None)
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
