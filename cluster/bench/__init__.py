"""`pdserve bench`: offline engine throughput, per-step latency against hardware limits, and online serving.

Modules: `metrics` (pure math, no torch), `workload` (lengths, prompts, arrivals), `report` (run metadata,
JSON, device timers), `hw_limits`, `engine_bench` + `hf_baseline`, `latency_bench`, `serve_bench` +
`serve_clients`, `plots`.
"""
