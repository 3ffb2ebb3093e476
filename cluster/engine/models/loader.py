"""Load a local Hugging Face checkpoint directory into our model: config, safetensors weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from cluster.engine.model_spec import ModelSpec
from cluster.engine.models.llama import LlamaForCausalLM

# HF name fragment -> (our fused parameter, shard index among its parts)
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_model_spec(model_dir: str | Path) -> ModelSpec:
    """Read config.json through transformers' AutoConfig and validate it."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a model directory: config.json not found")
    from transformers import AutoConfig

    return ModelSpec.from_hf_config(AutoConfig.from_pretrained(str(path), local_files_only=True))


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors weights (other formats are not supported)")
    return files


def _split_sizes(model: LlamaForCausalLM, fused: str) -> list[int]:
    spec = model.spec
    if fused == "qkv_proj":
        kv = spec.num_kv_heads * spec.head_dim
        return [spec.num_heads * spec.head_dim, kv, kv]
    return [spec.intermediate_size, spec.intermediate_size]


def load_weights(model: LlamaForCausalLM, model_dir: str | Path) -> None:
    """Copy every checkpoint tensor into the model; error on missing or unknown parameters."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in _weight_files(Path(model_dir)):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name == "lm_head.weight" and model.spec.tie_word_embeddings:
                    continue
                target, shard = _target(name)
                if target not in params:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in {model.spec.architecture}")
                param = params[target]
                tensor = f.get_tensor(name)
                with torch.no_grad():
                    if shard is None:
                        _copy(param.data, tensor, name)
                    else:
                        sizes = _split_sizes(model, target.split(".")[-2])
                        offset = sum(sizes[:shard])
                        _copy(param.data.narrow(0, offset, sizes[shard]), tensor, name)
                loaded.add(f"{target}#{shard}")
    expected = set()
    for pname in params:
        fused = pname.split(".")[-2] if pname.endswith((".weight", ".bias")) else ""
        if fused in ("qkv_proj", "gate_up_proj"):
            expected.update(f"{pname}#{i}" for i in range(len(_split_sizes(model, fused))))
        else:
            expected.add(f"{pname}#None")
    if model.spec.tie_word_embeddings:
        expected.discard("lm_head.weight#None")
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks {len(missing)} tensors, e.g. {missing[:5]}")


def _target(hf_name: str) -> tuple[str, int | None]:
    parts = hf_name.split(".")
    for i, p in enumerate(parts):
        if p in _FUSED:
            fused, shard = _FUSED[p]
            return ".".join(parts[:i] + [fused] + parts[i + 1:]), shard
    return hf_name, None


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src.to(dtype=dst.dtype))


def build_model(spec: ModelSpec, model_dir: str | Path, max_positions: int, dtype: torch.dtype,
                device: torch.device) -> LlamaForCausalLM:
    """Construct the model on `device` in `dtype` (no float32 detour) and load the checkpoint into it."""
    with torch.device("meta"):
        model = LlamaForCausalLM(spec, max_positions)
    model = model.to(dtype=dtype).to_empty(device=device)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary.build(device)  # cos/sin stay float32, as transformers computes them
    load_weights(model, model_dir)
    return model.eval()
