#!/usr/bin/env bash
# The serving path against the engine on this 2-core CPU machine (issue 13's CPU targets), one run:
#   bash docs/results/serving_path_cpu.sh OUTDIR
# tiny built-in model; bench engine (all at once, and the closed loop at 16), bench latency at B=16 / C=96,
# then a 1P+1D CPU cluster (`pdserve up`) under bench serve at concurrency 128 (128 x (64, 64)) and 16.
set -uo pipefail
OUT=${1:?usage: serving_path_cpu.sh OUTDIR}
mkdir -p "$OUT"
pd() { .venv/bin/pdserve "$@"; }
M=$(.venv/bin/python -c "from cluster.builtin_model import ensure_builtin_model; print(ensure_builtin_model())")
log() { grep -v "it/s\]\|req/s\]\|s/it\]" | tee -a "$OUT/summary.txt"; }
pd bench engine --model "$M" --num-prompts 128 --input-len 64 --output-len 64 --seed 0 --out "$OUT" 2>&1 | tail -2 | log
pd bench engine --model "$M" --num-prompts 64 --input-len 64 --output-len 64 --seed 0 --max-concurrency 16 --out "$OUT" 2>&1 | tail -2 | log
pd bench latency --model "$M" --batch-size 16 --context-len 96 --steps 64 --prefill-len 64 --out "$OUT" 2>&1 | grep decode | log
setsid .venv/bin/pdserve up --port 50071 --http-port 0 >"$OUT/up.log" 2>&1 &
UP=$!
for _ in $(seq 240); do grep -q "serving on" "$OUT/up.log" && break; sleep 0.5; done
grep -q "serving on" "$OUT/up.log" || { tail -30 "$OUT/up.log"; kill -INT $UP; exit 1; }
pd bench serve --target 127.0.0.1:50071 --num-prompts 128 --input-len 64 --output-len 64 --max-concurrency 128 --seed 0 --out "$OUT" 2>&1 | log
pd bench serve --target 127.0.0.1:50071 --num-prompts 64 --input-len 64 --output-len 64 --max-concurrency 16 --seed 0 --out "$OUT" 2>&1 | log
kill -INT $UP; wait $UP
