#!/usr/bin/env bash
# The serving path against the engine on one GPU (issue 13), every ratio from one run. From the repository root
# on the GPU host, after `source .device/setup.sh`:
#   bash docs/results/serving_path_gpu.sh OUTDIR PART...
# PARTs: engine1b (bench engine: all at once and closed loops at 64 / 256; bench latency at B=64 / 256, 1B),
#        colo1b (1 colocated worker, 1B), disagg1b (1P+1D on one GPU, 1B),
#        l8b (8B: latency, closed loop and 1 colocated worker, 1024 in / 128 out, concurrency 64),
#        http1b (1 colocated worker, 1B, 256 x (512, 128) at rate inf through gRPC and through the OpenAI HTTP API),
#        rps (router req/s of (32 in, 8 out) for 30 s with 1 and 4 router processes; 2,048 concurrent streams),
#        profinf (1024 x (512, 128) at rate inf: py-spy of `bench engine` and of the colocated worker's engine process).
# `pdserve` is `python3 -m cluster.cli` there. py-spy samples the router, the worker's engine process and its
# gRPC front end during a concurrency-256 run (colo1b, disagg1b).
set -uo pipefail
OUT=${1:?usage: serving_path_gpu.sh OUTDIR PART...}; shift
mkdir -p "$OUT"
export PYTHONPATH=$PWD/proto:${PYTHONPATH:-}
pd() { python3 -m cluster.cli "$@"; }
M1=/tmp/l1b M8=/tmp/l8b PORT=50051

model() { [ -d "$1" ] || pd make-model "$1" --shape "$2" --dtype bfloat16 --device cuda >/dev/null; }

up() {  # up LOG ARGS...: start a cluster, fail fast unless it serves within 150 s
  local log=$1; shift
  setsid python3 -m cluster.cli up --device cuda --port $PORT "$@" >"$log" 2>&1 &
  UP_PID=$!
  for _ in $(seq 300); do
    grep -q "serving on" "$log" && return 0
    kill -0 $UP_PID 2>/dev/null || break
    sleep 0.5
  done
  echo "cluster did not come up:"; tail -40 "$log"; down; return 1
}

down() { kill -INT $UP_PID 2>/dev/null; for _ in $(seq 60); do kill -0 $UP_PID 2>/dev/null || return 0; sleep 0.5; done
         kill -9 -- -$UP_PID 2>/dev/null; ray stop --force >/dev/null 2>&1; }

serve() {  # serve NAME ARGS...
  pd bench serve --target 127.0.0.1:$PORT --seed 0 --out "$OUT/$1" "${@:2}" 2>&1 | grep -v "it/s\]\|req/s\]" | tee -a "$OUT/summary.txt"
}

profile() {  # profile TAG: py-spy the router (this cluster's `up`), engine processes and front ends for 8 s
  local pids
  pids="router:$UP_PID $(pgrep -f 'ray::WorkerActor' | sed 's/^/engine:/') $(pgrep -f cluster.worker.frontend | sed 's/^/frontend:/')"
  for p in $pids; do
    py-spy record --nonblocking -d 8 -r 250 -f raw -o "$OUT/pyspy-$1-${p%%:*}-${p##*:}.txt" --pid "${p##*:}" >/dev/null 2>&1 &
    py-spy record --nonblocking --gil -d 8 -r 250 -f raw -o "$OUT/pyspy-$1-${p%%:*}-${p##*:}-gil.txt" --pid "${p##*:}" >/dev/null 2>&1 &
  done
}

for part in "$@"; do
  echo "=== $part" | tee -a "$OUT/summary.txt"
  case $part in
  engine1b)
    model $M1 llama-3.2-1b
    pd bench engine --model $M1 --device cuda --num-prompts 256 --input-len 512 --output-len 128 --seed 0 --out "$OUT/engine" 2>&1 | tail -2 | tee -a "$OUT/summary.txt"
    for b in 64 256; do
      pd bench latency --model $M1 --device cuda --batch-size $b --context-len 640 --steps 64 --prefill-len 512 --out "$OUT/latency" 2>&1 | tail -4 | tee -a "$OUT/summary.txt"
      pd bench engine --model $M1 --device cuda --num-prompts $((b * 4)) --input-len 512 --output-len 128 --seed 0 --max-concurrency $b --out "$OUT/engine" 2>&1 | tail -2 | tee -a "$OUT/summary.txt"
    done ;;
  colo1b|disagg1b)
    model $M1 llama-3.2-1b
    if [ $part = colo1b ]; then up "$OUT/up-$part.log" --model $M1 --mode colocated --colocated 1 || continue
    else up "$OUT/up-$part.log" --model $M1 --prefill 1 --decode 1 --gpus-per-worker 0.5 || continue; fi
    serve $part-inf --num-prompts 256 --input-len 512 --output-len 128 --request-rate inf
    serve $part-c64 --num-prompts 512 --input-len 512 --output-len 128 --max-concurrency 64
    (sleep 6; profile $part; sleep 9) & PROF=$!
    serve $part-c256 --num-prompts 1024 --input-len 512 --output-len 128 --max-concurrency 256
    wait $PROF
    down ;;
  l8b)
    model $M8 llama-3.1-8b
    pd bench latency --model $M8 --device cuda --batch-size 64 --context-len 1152 --steps 64 --prefill-len 1024 --out "$OUT/latency" 2>&1 | tail -4 | tee -a "$OUT/summary.txt"
    pd bench engine --model $M8 --device cuda --num-prompts 384 --input-len 1024 --output-len 128 --seed 0 --max-concurrency 64 --out "$OUT/engine" 2>&1 | tail -2 | tee -a "$OUT/summary.txt"
    up "$OUT/up-$part.log" --model $M8 --mode colocated --colocated 1 || continue
    serve $part-c64 --num-prompts 384 --input-len 1024 --output-len 128 --max-concurrency 64
    down ;;
  http1b)
    model $M1 llama-3.2-1b
    up "$OUT/up-$part.log" --model $M1 --mode colocated --colocated 1 --http-port 8000 || continue
    for i in 1 2; do
      serve $part-grpc-$i --num-prompts 256 --input-len 512 --output-len 128 --request-rate inf
      serve $part-openai-$i --backend openai --target http://127.0.0.1:8000 --model $M1 --num-prompts 256 --input-len 512 --output-len 128 --request-rate inf
    done
    down ;;
  profinf)
    model $M1 llama-3.2-1b
    pd bench engine --model $M1 --device cuda --num-prompts 256 --input-len 512 --output-len 128 --seed 0 --out "$OUT/engine" 2>&1 | tail -2 | tee -a "$OUT/summary.txt"
    py-spy record --nonblocking -r 250 -f raw -o "$OUT/pyspy-profinf-bench-engine.txt" -- python3 -m cluster.cli bench engine --model $M1 --device cuda --num-prompts 1024 --input-len 512 --output-len 128 --seed 0 --out "$OUT/engine" 2>&1 | tail -2 | tee -a "$OUT/summary.txt"
    up "$OUT/up-$part.log" --model $M1 --mode colocated --colocated 1 || continue
    serve $part-warm --num-prompts 256 --input-len 512 --output-len 128 --request-rate inf
    (sleep 4; profile $part; sleep 9) & PROF=$!
    serve $part --num-prompts 1024 --input-len 512 --output-len 128 --request-rate inf
    wait $PROF
    down ;;
  rps)
    model $M1 llama-3.2-1b
    for n in 1 4; do
      up "$OUT/up-$part-$n.log" --model $M1 --mode colocated --colocated 1 --router-processes $n || continue
      [ $n = 1 ] && { (sleep 15; profile $part-$n; sleep 9) & }
      serve $part-$n --num-prompts 60000 --input-len 32 --output-len 8 --request-rate 2000 --client-processes 8
      wait
      [ $n = 4 ] && serve streams2048 --num-prompts 4096 --input-len 32 --output-len 64 --max-concurrency 2048 --client-processes 8
      grep -c "Too many connections" "$OUT/up-$part-$n.log" | sed "s/^/Redis 'Too many connections' lines in the log: /" | tee -a "$OUT/summary.txt"
      down
    done ;;
  esac
done
