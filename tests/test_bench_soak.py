"""`pdserve bench soak` on CPU, as a user runs it: 1,000 mixed requests on a cluster it starts (1 prefill + 2
decode workers, its own Ray and redis-server), a decode worker SIGKILLed at 30% and the redis-server at 60%.
Every request ends with a status its kind allows, no KV block is held anywhere after traffic settles, the
supervisors brought both back, and no process's RSS grew by 10% or more. Also the request mix itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.bench.soak_load import BAD_VARIANTS, Mix, plan, request
from router.errors import RouterError
from router.model_info import ModelInfo
from router.validation import validate

REPO = Path(__file__).resolve().parents[1]


def test_plan_mixes_every_kind_and_fits_the_model() -> None:
    specs = plan(2000, Mix(cancel_share=0.1, deadline_share=0.1, bad_share=0.1), vocab_size=500, max_model_len=128,
                 seed=3)
    kinds = {k: sum(s.kind == k for s in specs) for k in ("normal", "cancel", "deadline", "bad")}
    assert all(150 < kinds[k] < 250 for k in ("cancel", "deadline", "bad")), kinds
    assert all(len(s.prompt) + s.max_tokens <= 128 and all(3 <= t < 500 for t in s.prompt) for s in specs)
    assert {s.bad for s in specs if s.kind == "bad"} == set(BAD_VARIANTS)
    assert plan(50, Mix(), 500, 128, seed=3) == plan(50, Mix(), 500, 128, seed=3)


def test_every_bad_variant_is_refused_by_validation(tiny_llama) -> None:
    model = ModelInfo.load(str(tiny_llama), None, 256)
    good = plan(1, Mix(bad_share=0), model.vocab_size, model.max_model_len, seed=0)[0]
    validate(request(good, model.vocab_size, model.max_model_len), model)
    for variant in BAD_VARIANTS:
        spec = plan(1, Mix(bad_share=0), model.vocab_size, model.max_model_len, seed=0)[0]
        bad = request(type(spec)(**{**spec.__dict__, "kind": "bad", "bad": variant}), model.vocab_size,
                      model.max_model_len)
        with pytest.raises(RouterError) as refused:
            validate(bad, model)
        assert refused.value.code.name == "INVALID_ARGUMENT", variant


@pytest.mark.slow
@pytest.mark.timeout(600, func_only=True)
def test_soak_1000_requests_with_a_worker_kill_and_a_redis_restart(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "soak", "--num-requests", "1000",
                           "--kill-worker-at", "0.3", "--restart-redis-at", "0.6", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=540)
    results = list(tmp_path.glob("soak-*/result.json"))
    assert results, done.stderr[-3000:]
    r = json.loads(results[0].read_text())
    assert sum(r["statuses"].values()) == 1000
    assert r["num_unexpected"] == 0, r["unexpected"]
    assert set(r["by_kind"]["bad"]) == {"INVALID_ARGUMENT"}
    assert r["statuses"]["OK"] > 500 and {"CLIENT_CANCELLED", "DEADLINE_EXCEEDED"} <= r["statuses"].keys()
    assert [f["fault"] for f in r["faults"]] == ["worker killed", "redis-server killed"]
    assert r["workers_replaced"] >= 1 and r["redis_restarts"] >= 1
    assert r["leaked_blocks"] == 0 and all(w.get("leaked") == 0 for w in r["worker_blocks"]), r["worker_blocks"]
    assert all(w["outstanding"] == 0 for w in r["registry"]) and not any(r["router_holds"].values())
    growth = [r["rss_growth"]["router"], *r["rss_growth"]["workers"].values()]
    assert all(g is None or g < 0.10 for g in growth), r["rss_growth"]
    assert sum(g is not None for g in growth) >= 3  # the router and the two workers never killed
    assert r["problems"] == [] and done.returncode == 0, done.stderr[-2000:]
