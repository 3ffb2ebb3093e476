"""`pdserve bench compare` end to end on CPU: both modes come up, are measured and reported (slow)."""

from __future__ import annotations

import json
import re

import pytest

from cluster.bench import kv_trace_report
from cluster.cli import main
from cluster.kv_trace import ENV as KV_TRACE_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_compare_disaggregated_and_colocated(tiny_llama, ray_session, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KV_TRACE_ENV, "")  # --kv-trace sets it for the run; restored afterwards
    rc = main(["bench", "compare", "--model", str(tiny_llama), "--device", "cpu", "--transport", "auto",
               "--modes", "disaggregated,colocated/32", "--input-range", "20,60", "--output-range", "4,8",
               "--num-prompts", "6", "--seconds-per-rate", "0.5", "--request-rate", "8,inf",
               "--unloaded-requests", "2", "--kv-trace", "--out", str(tmp_path)])
    assert rc == 0
    (folder,) = list(tmp_path.glob("compare-*"))
    result = json.loads((folder / "result.json").read_text())
    assert (folder / "slo_attainment.png").stat().st_size > 1000
    assert set(result["modes"]) == {"disaggregated", "colocated/32"}  # colocated with a 32-token step budget
    assert result["slo"]["ttft_ms"] > 0 and result["slo"]["tpot_ms"] > 0
    assert result["slo_tbt"] == {"ttft_ms": result["slo"]["ttft_ms"], "tbt_ms": result["slo"]["tpot_ms"]}
    for data in result["modes"].values():
        assert data["unloaded_ttft_ms"] > 0 and data["unloaded_tpot_ms"] > 0
        assert [p["rate"] for p in data["points"]] == [8.0, "inf"]
        # --seconds-per-rate 0.5: ceil(8 x 0.5) = 4 requests at 8 req/s; the infinite rate keeps --num-prompts
        assert [(p["completed"], p["failed"]) for p in data["points"]] == [(4, 0), (6, 0)]
        assert all(0.0 <= p["slo_attainment"] <= 1.0 and 0.0 <= p["tbt_slo_attainment"] <= 1.0
                   for p in data["points"])
        assert "goodput_rate_tbt" in data
        # the server's own TTFT breakdown is kept per request and summarized per rate
        assert all(p["server_prefill_ms_p50"] > 0 and p["server_queue_ms_p90"] >= 0 for p in data["points"])
        rows = [r for rows in data["requests"].values() for r in rows]
        assert all(r["server_ms"]["prefill_ms"] > 0 and r["server_ms"]["placement_ms"] > 0 for r in rows)
        assert all(r["tbt_ms"] > 0 for r in rows)
    handoff = [p["server_kv_handoff_ms_p50"] for p in result["modes"]["colocated/32"]["points"]]
    assert handoff == [0.0, 0.0]  # no KV moves in colocated mode
    assert all(p["server_kv_handoff_ms_p90"] > 0 for p in result["modes"]["disaggregated"]["points"])
    # --kv-trace: the prefill workers traced each rate's handoffs, with the receiver's times in them
    assert list(folder.glob("kv-trace/kv-trace-*.jsonl"))
    for p, sent in zip(result["modes"]["disaggregated"]["points"], (4, 6), strict=True):
        phases = p["kv_trace"]
        assert phases["handoffs"] == sent
        assert {"exposed", "all_sent", "end_seen", "posted", "data", "answer"} <= set(phases)
        assert phases["exposed"]["p50"] > 0 and phases["answer"]["p50"] >= 0
        assert phases["exposed"]["p90"] >= phases["answer"]["p90"]
    assert all(p["kv_trace"]["handoffs"] == 0 for p in result["modes"]["colocated/32"]["points"])
    # the same traces, summarised by `python -m cluster.bench.kv_trace_report DIR`: one line per transfer size
    capsys.readouterr()  # the compare's own report
    kv_trace_report.main([str(folder / "kv-trace")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines and all(re.fullmatch(r"\w+ \d+ blocks( streamed)?: \d+ handoffs, ms p50/p90: exposed .*", x)
                         for x in lines), lines
    traced = sum(len(f.read_text().splitlines()) for f in folder.glob("kv-trace/kv-trace-*.jsonl"))
    assert sum(int(x.split(": ")[1].split()[0]) for x in lines) == traced >= 4 + 6  # every traced handoff, once


def test_compare_rejects_unknown_modes_before_starting_anything(tmp_path, capsys):
    from cluster.bench.compare_bench import mode_spec, requests_per_rate

    assert requests_per_rate([2.0, 12.5, float("inf")], 40, None) == [40, 40, 40]
    assert requests_per_rate([2.0, 12.5, float("inf")], 40, 10.0) == [20, 125, 40]
    with pytest.raises(ValueError, match="seconds-per-rate"):
        requests_per_rate([2.0], 40, 0.0)

    assert mode_spec("colocated", 8192) == ("colocated", 8192)
    assert mode_spec("colocated/1024", 8192) == ("colocated", 1024)
    for bad in ("colo", "colocated/abc", "colocated/8", "disaggregated/"):
        with pytest.raises(ValueError, match="mode|budget"):
            mode_spec(bad, 8192)
    # a clear error before the model is even read (tmp_path holds none), so no cluster starts
    assert main(["bench", "compare", "--model", str(tmp_path), "--modes", "colocated,colocated",
                 "--out", str(tmp_path)]) == 2
    assert "lists a mode twice" in capsys.readouterr().err
