"""Tests for the random-weight model maker (tiny shapes only; big shapes are checked through their configs)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from cluster.engine import make_model as mm
from cluster.engine.model_spec import ModelSpec

ARCHS = ("llama", "qwen2", "mistral")
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Zebras, xylophones & quokkas: 12345 + 678 = 13023?!",
    "  Leading spaces, trailing tabs\t and a newline\nsecond line.",
    "She said \"hello\" (twice) -- then left; {braces} [brackets] <angles> ~tilde~ `code` #tag @user 50%",
    "I'LL SEE you at 10:30pm\r\n\tOK?",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny")
    return {arch: mm.make_model(base / arch, arch=arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_loads_in_transformers(tiny: dict[str, Path], arch: str) -> None:
    d = tiny[arch]
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", mm.MARKER):
        assert (d / name).is_file(), name
    assert json.loads((d / mm.MARKER).read_text())["complete"] is True
    config = AutoConfig.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    assert config.architectures == [mm.ARCHS[arch]]
    assert (config.bos_token_id, config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert tok.bos_token == mm.BOS and tok.eos_token == mm.EOS
    assert len(tok) == config.vocab_size == mm.TOKENIZER_VOCAB
    gen = json.loads((d / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)

    model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    assert model.dtype == torch.float32
    ids = tok(SENTENCES[0], return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits[0, -1].std() > 0.1  # spread out, not near-uniform

    spec = ModelSpec.from_hf_config(config)
    n_file = sum(t.numel() for t in load_file(d / "model.safetensors").values())
    assert spec.num_params == n_file == sum(p.numel() for p in model.parameters())


def test_tiny_arch_specifics(tiny: dict[str, Path]) -> None:
    specs = {a: ModelSpec.from_hf_config(AutoConfig.from_pretrained(tiny[a])) for a in ARCHS}
    assert specs["llama"].rope.rope_type == "llama3" and not specs["llama"].tie_word_embeddings
    assert specs["qwen2"].tie_word_embeddings and specs["qwen2"].attention_bias
    assert not specs["mistral"].tie_word_embeddings
    assert AutoConfig.from_pretrained(tiny["mistral"]).sliding_window is None
    for spec in specs.values():
        assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (
            128, 4, 4, 2, 32)
    qwen = load_file(tiny["qwen2"] / "model.safetensors")
    assert "lm_head.weight" not in qwen and "model.layers.0.self_attn.q_proj.bias" in qwen
    llama = load_file(tiny["llama"] / "model.safetensors")
    assert "lm_head.weight" in llama and "model.layers.0.self_attn.q_proj.bias" not in llama
    norm, emb = llama["model.layers.0.input_layernorm.weight"], llama["model.embed_tokens.weight"]
    assert abs(norm.mean().item() - 1.0) < 0.05
    std = mm.SHAPES["tiny"].initializer_range
    assert abs(emb.std().item() - std) < 0.1 * std and abs(emb.mean().item()) < 0.1 * std


def test_same_seed_same_bytes(tmp_path: Path, tiny: dict[str, Path]) -> None:
    again = mm.make_model(tmp_path / "again", arch="llama", seed=0)
    for f in sorted(tiny["llama"].iterdir()):
        assert (again / f.name).read_bytes() == f.read_bytes(), f.name
    other = mm.make_model(tmp_path / "other", arch="llama", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    assert (other / "config.json").read_bytes() == (again / "config.json").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


def test_sharding_matches_single_file(tmp_path: Path, tiny: dict[str, Path],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mm, "MAX_SHARD_BYTES", 512 * 1024)
    d = mm.make_model(tmp_path / "sharded", arch="llama")
    shards = sorted(d.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (d / "model.safetensors").exists()
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    merged = {k: v for s in shards for k, v in load_file(s).items()}
    single = load_file(tiny["llama"] / "model.safetensors")
    assert merged.keys() == single.keys() and all(torch.equal(merged[k], single[k]) for k in single)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    _, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_bfloat16(tmp_path: Path) -> None:
    d = mm.make_model(tmp_path / "bf16", arch="qwen2", dtype="bfloat16")
    assert {t.dtype for t in load_file(d / "model.safetensors").values()} == {torch.bfloat16}
    assert AutoConfig.from_pretrained(d).dtype in ("bfloat16", torch.bfloat16)


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_roundtrip(tiny: dict[str, Path], arch: str) -> None:
    tok = AutoTokenizer.from_pretrained(tiny[arch])  # transformers 5 picks Qwen2Tokenizer for qwen2
    assert tok.unk_token is None and tok.pad_token_id == tok.eos_token_id
    reference = AutoTokenizer.from_pretrained(tiny["llama"])
    for s in [*SENTENCES, "naïve café ☃ 日本語 🎉"]:
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
        ids = tok.encode(s)
        assert ids == reference.encode(s) and max(ids) < mm.TOKENIZER_VOCAB
        assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == s
    assert len(tok.encode("The quick brown fox", add_special_tokens=False)) <= 5  # merges were learned
    assert mm.build_tokenizer().backend_tokenizer.to_str() == mm.build_tokenizer().backend_tokenizer.to_str()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"arch": "gpt2"}, "unknown arch 'gpt2'; valid: llama, qwen2, mistral"),
    ({"shape": "huge"}, "unknown shape 'huge'; valid: tiny, llama-3.2-1b"),
    ({"arch": "qwen2", "shape": "llama-3.2-1b"}, "valid arch/shape: .*qwen2/qwen2.5-0.5b"),
    ({"arch": "mistral", "shape": "qwen2.5-1.5b"}, "not available for arch 'mistral'"),
    ({"dtype": "int8"}, "unknown dtype 'int8'"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"device": "tpu"}, "device must be"),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mm.make_model(tmp_path / "m", **kwargs)
    assert not (tmp_path / "m").exists()


def test_refuses_foreign_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        mm.make_model(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    mm.make_model(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "model.safetensors").is_file()
    # a directory made here may be remade; stale shards are removed
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    mm.make_model(tmp_path, seed=3)
    assert not (tmp_path / "model-00001-of-00002.safetensors").exists()
    assert json.loads((tmp_path / mm.MARKER).read_text())["seed"] == 3


@pytest.mark.parametrize(("arch", "shape", "expected"), [
    ("llama", "llama-3.2-1b", 1_235_814_400),
    ("llama", "llama-3.1-8b", 8_030_261_248),
    ("qwen2", "qwen2.5-0.5b", 494_032_768),
    ("qwen2", "qwen2.5-1.5b", 1_543_714_304),
])
def test_real_shape_param_counts(arch: str, shape: str, expected: int) -> None:
    config = mm.build_config(arch, shape)
    spec = ModelSpec.from_hf_config(config)
    assert spec.num_params == expected == sum(math.prod(s) for _, s in mm.param_shapes(config))
    assert spec.max_position_embeddings == mm.SHAPES[shape].max_position_embeddings
    if shape == "llama-3.2-1b":
        assert spec.tie_word_embeddings and spec.rope.factor == 32.0 and spec.rope.theta == 500000.0
    if shape == "llama-3.1-8b":
        assert not spec.tie_word_embeddings and spec.rope.factor == 8.0 and spec.rope.rope_type == "llama3"
    if arch == "qwen2":
        assert spec.attention_bias and spec.tie_word_embeddings and spec.rope.theta == 1e6


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    mm.add_make_model_args(parser)
    args = parser.parse_args([str(tmp_path / "cli"), "--arch", "mistral", "--seed", "7"])
    assert (args.shape, args.dtype, args.device, args.overwrite) == ("tiny", "float32", "cpu", False)
    assert mm.run_make_model(args) == 0
    out = capsys.readouterr().out
    assert "mistral/tiny" in out and "model.safetensors" in out and "config.json" in out
    assert AutoConfig.from_pretrained(tmp_path / "cli").architectures == ["MistralForCausalLM"]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    assert mm.run_make_model(parser.parse_args([str(tmp_path / "junk")])) == 2
    assert "not empty" in capsys.readouterr().err
    assert parser.parse_args(["d", "--shape", "qwen2.5-0.5b"]).arch is None  # inferred from the shape
    with pytest.raises(SystemExit):
        parser.parse_args(["d", "--arch", "gpt2"])
