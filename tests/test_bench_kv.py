"""`pdserve bench kv` on CPU: the repeat capping and argument checks, then real runs (two spawned processes,
gloo and grpc, tiny shapes) through the CLI, checked against the JSON they write. Also `bench blocks`, the
block-id fragmentation that decides cuda_ipc's copy path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cluster.bench.kv_bench import parse_ints, parse_transports
from cluster.bench.kv_plan import timed_loop
from cluster.cli import main

# tiny shape: 4 layers, 2 kv heads, head_dim 32; float32, block 16 -> 4 * 2 * 16 * 2 * 32 * 4 bytes
TINY_BLOCK_BYTES = 32768


def _loop(seconds: float, warmup: int, repeats: int, min_repeats: int = 3, budget: float = 10.0) -> tuple[Any, ...]:
    calls: list[int] = []

    def once(i: int) -> float:
        calls.append(i)
        return seconds

    times, warm, capped = timed_loop(once, warmup, repeats, min_repeats, budget)
    assert calls == list(range(warm + len(times)))  # indices run on; index 0 is the (verified) first warm-up
    return len(times), warm, capped


def test_timed_loop_caps_slow_cases():
    assert _loop(0.01, warmup=2, repeats=10) == (10, 2, False)
    assert _loop(0.01, warmup=0, repeats=4) == (4, 1, False)  # at least one untimed, verified transfer
    assert _loop(2.0, warmup=2, repeats=10) == (5, 2, True)  # 10 s budget at 2 s each
    assert _loop(6.0, warmup=3, repeats=10) == (3, 1, True)  # warm-ups stop past half the budget; min 3
    assert _loop(6.0, warmup=1, repeats=2) == (2, 1, False)  # never more than asked for
    assert _loop(30.0, warmup=1, repeats=10, min_repeats=1) == (1, 1, True)


def test_arguments_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert parse_ints("512, 2048,8192", "x") == [512, 2048, 8192] and parse_ints("7", "x") == [7]
    for bad in ("", "0", "a,1", "-3"):
        with pytest.raises(ValueError):
            parse_ints(bad, "x")
    assert parse_transports(None, "cpu") == ["gloo", "grpc"]
    assert parse_transports(None, "cuda") == ["nccl", "cuda_ipc", "grpc"]
    assert parse_transports("grpc,gloo,grpc", "cpu") == ["grpc", "gloo"]
    with pytest.raises(ValueError, match="carrier"):
        parse_transports("carrier,gloo", "cpu")
    with pytest.raises(ValueError, match="--device cuda"):
        parse_transports("nccl,cuda_ipc", "cpu")
    out = str(tmp_path)
    for argv, message in ((["--shape", "llama-9000"], "unknown shape"), (["--model", out], "not a model directory"),
                          (["--shape", "tiny", "--transport", "nccl"], "--device cuda"),
                          (["--shape", "tiny", "--device", "cuda", "--gpus", "0,0", "--transport", "nccl,cuda_ipc"],
                           "nccl cannot pair a GPU with itself"),
                          (["--shape", "tiny", "--prompt-len", "0"], "--prompt-len"),
                          (["--shape", "tiny", "--prefill"], "--prefill runs the model"),
                          (["--shape", "tiny", "--profile"], "give --prefill too")):
        assert main(["bench", "kv", *argv, "--out", out]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --model and --shape exclude each other
        main(["bench", "kv", "--shape", "tiny", "--model", out, "--out", out])
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def _result(out: Path) -> dict[str, Any]:
    (run,) = out.glob("kv-*/result.json")
    return json.loads(run.read_text())


@pytest.mark.timeout(120)
def test_bench_kv_cpu_gloo_and_grpc(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    rc = main(["bench", "kv", "--shape", "tiny", "--prompt-len", "40,100", "--transport", "gloo,grpc",
               "--dtype", "float32", "--repeats", "4", "--warmup", "1", "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "raw gloo ms" in printed and "wrote" in printed
    r = _result(tmp_path)
    assert r["benchmark"] == "kv" and r["device"] == "cpu" and r["problems"] == []
    assert r["model"]["shape"] == "tiny" and r["model"]["arch"] == "llama" and r["model"]["num_layers"] == 4
    assert r["layout"]["bytes_per_block"] == TINY_BLOCK_BYTES and r["layout"]["cache_blocks"] == 7 + 8
    assert r["devices"]["sender"] == r["devices"]["receiver"] == "cpu" and r["raw_backend"] == "gloo"
    assert [(x["prompt_len"], x["blocks"], x["bytes"]) for x in r["raw"]] == [
        (40, 3, 3 * TINY_BLOCK_BYTES), (100, 7, 7 * TINY_BLOCK_BYTES)]
    raw = {x["prompt_len"]: x for x in r["raw"]}
    assert [(x["transport"], x["prompt_len"]) for x in r["results"]] == [
        ("gloo", 40), ("gloo", 100), ("grpc", 40), ("grpc", 100)]
    for row in r["results"]:
        assert row["verified"] is True and row["repeats"] == 4 and row["warmup"] == 1 and not row["capped"]
        assert len(row["handoff_times_ms"]) == 4
        assert 0 < row["handoff_p10_ms"] <= row["handoff_ms"] <= row["handoff_p90_ms"]
        assert row["handoff_gbps"] == pytest.approx(row["bytes"] / row["handoff_ms"] / 1e6)
        assert row["raw_p2p_ms"] == raw[row["prompt_len"]]["median_ms"] > 0
        assert row["raw_gbps"] == pytest.approx(row["bytes"] / row["raw_p2p_ms"] / 1e6)
        assert row["ratio"] == pytest.approx(row["raw_p2p_ms"] / row["handoff_ms"])


@pytest.mark.timeout(120)
def test_bench_kv_from_config_json_and_failed_sends(tmp_path: Path):
    """--model needs only config.json; sends that time out become error rows (exit 1), the run still ends."""
    from cluster.engine.make_model import build_config

    model = tmp_path / "model"
    build_config("qwen2", "tiny", "bfloat16").save_pretrained(model)
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]
    rc = main(["bench", "kv", "--model", str(model), "--prompt-len", "33", "--transport", "grpc",
               "--repeats", "2", "--out", str(tmp_path / "ok")])
    assert rc == 0
    r = _result(tmp_path / "ok")
    assert r["model"]["path"] == str(model) and r["model"]["architecture"] == "Qwen2ForCausalLM"
    assert r["dtype"] == "bfloat16" and r["layout"]["bytes_per_block"] == TINY_BLOCK_BYTES // 2
    (row,) = r["results"]
    assert (row["transport"], row["blocks"], row["repeats"], row["verified"]) == ("grpc", 3, 2, True)

    rc = main(["bench", "kv", "--model", str(model), "--prompt-len", "16", "--transport", "gloo",
               "--send-timeout", "0.000001", "--out", str(tmp_path / "bad")])
    assert rc == 1
    r = _result(tmp_path / "bad")
    (row,) = r["results"]
    assert "timed out" in row["error"] and r["problems"] and "handoff_ms" not in row
    assert r["raw"][0]["median_ms"] > 0  # the raw reference ran regardless


@pytest.mark.timeout(180)
def test_bench_kv_prefill_cpu(tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str]):
    """--prefill runs the real engine on the sender: prefill alone, streamed and bulk, interleaved."""
    rc = main(["bench", "kv", "--model", str(tiny_llama), "--prefill", "--prompt-len", "40", "--transport", "gloo",
               "--dtype", "float32", "--repeats", "2", "--warmup", "1", "--profile", "--out", str(tmp_path)])
    assert rc == 0
    assert "TTFT: prefill alone" in capsys.readouterr().out
    r = _result(tmp_path)
    (row,) = r["prefill"]
    assert (row["transport"], row["prompt_len"], row["repeats"]) == ("gloo", 40, 2)
    assert min(row["prefill_ms"], row["streamed_ms"], row["bulk_ms"]) > 0
    assert {k: len(v) for k, v in row["times_ms"].items()} == {"alone": 2, "streamed": 2, "bulk": 2}
    assert row["exposed_streamed_ms"] == pytest.approx(row["streamed_ms"] - row["prefill_ms"])
    lo, hi = row["overhead_paired_ci95_pct"]  # each repetition's streamed over its own alone
    assert lo <= row["overhead_paired_pct"] <= hi
    # --profile: a torch.profiler trace per mode and the per-op comparison, beside result.json
    prof = row["profile"]
    (folder,) = list(tmp_path.glob("kv-*"))
    traces = [json.loads((folder / "profile" / name).read_text()) for name in prof["traces"]]
    assert all(t["traceEvents"] for t in traces) and set(prof["wall_ms"]) == {"alone", "streamed"}
    ops = (folder / "profile" / prof["ops"]).read_text().splitlines()
    assert ops[0].startswith("gloo-prefill-40: each op's own CPU time") and "(all ops)" in ops[2]
    assert any(line.endswith("aten::mm") for line in ops)  # the model's matmuls are in it


@pytest.mark.timeout(120)
def test_bench_kv_receiver_busy(tmp_path: Path):
    """--receiver-busy spins a pure-Python thread in the receiver; --switch-interval-ms applies to both."""
    rc = main(["bench", "kv", "--shape", "tiny", "--prompt-len", "32", "--transport", "gloo", "--dtype", "float32",
               "--repeats", "2", "--receiver-busy", "--switch-interval-ms", "0.5", "--out", str(tmp_path)])
    assert rc == 0
    r = _result(tmp_path)
    assert r["receiver_busy"] is True and r["switch_interval_ms"] == 0.5 and r["problems"] == []
    assert r["results"][0]["verified"] is True


def test_freed_blocks_come_back_as_one_run():
    """Blocks return to the free list tail first; an allocation still takes them in ascending order, so a
    request that reuses a finished one's blocks sends them as ONE run (cuda_ipc: one copy-engine copy)."""
    from cluster.engine.block_manager import BlockManager
    from cluster.transport.ipc_copy import block_runs

    bm = BlockManager(64, 16)
    first = bm.allocate_blocks(16 * 20)
    bm.release_blocks(first)
    bm.allocate_blocks(16 * 43)  # the rest of the never-used blocks
    again = bm.allocate_blocks(16 * 20)
    assert sorted(again) == sorted(first) and block_runs(again, list(range(100, 120))) == [(first[0], 100, 20)]


def test_growth_takes_the_lowest_free_block_without_a_prefix_cache():
    """No prefix cache (decode workers): growth fills the lowest hole, so the long free run stays whole."""
    from cluster.engine.block_manager import BlockManager

    bm = BlockManager(40, 16, enable_prefix_caching=False, growth="lowest_id")
    first = bm.allocate_blocks(16 * 5)
    assert bm.allocate_blocks(16 * 5) == [6, 7, 8, 9, 10]  # held: the hole [1..5] opens below it
    bm.release_blocks(first)
    assert [bm.grow_block(), bm.grow_block()] == [1, 2]  # not 11, 12 from the free list's front
    assert bm.allocate_blocks(16 * 29) == list(range(11, 40))  # the untouched run, in one piece
    for _ in range(100):  # FIFO churn: heap entries pile up (3 per round) until a rebuild clears them
        bm.release_blocks(bm.allocate_blocks(16 * 3))
    assert len(bm._lowest or []) > 2 * bm.num_blocks
    assert bm.grow_block() == 3 and len(bm._lowest or []) <= 2 * bm.num_blocks
    with_cache = BlockManager(40, 16)
    with_cache.release_blocks(with_cache.allocate_blocks(16 * 5))
    assert with_cache.grow_block() == 6  # with a prefix cache: the free list's front (LRU eviction order)


def test_bench_kv_churned_ids(tmp_path: Path):
    """--churned-ids: ids from the allocator replay, in caches of 16 longest prompts; still bit-exact."""
    from cluster.bench.blocks_bench import churned_ids

    src, dst = churned_ids(16 * 32 + 8, 16, 32, 0)
    assert len(src) == len(set(src)) == 32 == len(dst) == len(set(dst)) and max(src + dst) < 16 * 32 + 8
    assert main(["bench", "kv", "--shape", "tiny", "--prompt-len", "64", "--transport", "gloo", "--dtype",
                 "float32", "--repeats", "2", "--churned-ids", "--out", str(tmp_path)]) == 0
    r = _result(tmp_path)
    assert r["churned_ids"] is True and r["layout"]["cache_blocks"] == 16 * 4 + 8
    assert r["results"][0]["verified"] is True and r["problems"] == []


def test_bench_blocks(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """The replay through real BlockManagers: with short outputs and a big cache nothing fragments (one run
    per transfer); with churn the decode side fragments, and the JSON says how much."""
    rc = main(["bench", "blocks", "--transfers", "30", "--output-range", "1,1", "--arrival-prob", "1",
               "--out", str(tmp_path / "calm")])
    calm = json.loads(next((tmp_path / "calm").glob("blocks-*/result.json")).read_text())
    assert rc == 0 and calm["pair_runs"]["median"] == 1 and calm["share_copy_engine"] == 1.0
    assert main(["bench", "blocks", "--transfers", "300", "--decode-blocks", "20000",
                 "--out", str(tmp_path / "busy")]) == 0
    busy = json.loads(next((tmp_path / "busy").glob("blocks-*/result.json")).read_text())
    assert busy["pair_runs"]["median"] >= busy["dst_runs"]["median"] > 1 and busy["transfers"] == 200
    assert "copy-engine path" in capsys.readouterr().out
    assert main(["bench", "blocks", "--arrival-prob", "0", "--out", str(tmp_path)]) == 2
    assert "--arrival-prob must be in (0, 1]" in capsys.readouterr().err
