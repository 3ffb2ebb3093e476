#!/usr/bin/env bash
# Issue 18 on one GPU: the KV transport before (commit f097181) and after its rebuild, alternated on one host,
# then the one-GPU transport tests. From the repository root on the GPU host, after `source .device/setup.sh`,
# with the "before" tree exported beside it (git-ignored):
#   git archive f097181 | (mkdir -p .before && tar -x -C .before)
#   bash docs/results/kv_before_after_gpu.sh OUTDIR [REPEATS]
set -uo pipefail
OUT=${1:?usage: kv_before_after_gpu.sh OUTDIR [REPEATS]}; REPEATS=${2:-40}
mkdir -p "$OUT"
AFTER=$PWD BEFORE=$PWD/.before
kv() {  # kv TREE TAG ARGS...: one bench kv run from that tree
  local tree=$1 tag=$2; shift 2
  echo "=== $tag $*" | tee -a "$OUT/summary.txt"
  (cd "$tree" && PYTHONPATH=$tree/proto:$tree:/tmp/site timeout 150 python3 -m cluster.cli bench kv --shape llama-3.1-8b \
     --gpus 0,0 --transport cuda_ipc --device cuda --repeats "$REPEATS" --out "$OUT/$tag" "$@") 2>&1 \
    | grep -v "it/s\]" | tail -8 | tee -a "$OUT/summary.txt"
}
for round in 1 2; do
  kv "$BEFORE" before-$round --churned-ids --prompt-len 2048
  kv "$AFTER" after-$round --churned-ids --prompt-len 2048
done
kv "$BEFORE" before-contig --contiguous-ids --prompt-len 8192
kv "$AFTER" after-contig --contiguous-ids --prompt-len 8192
echo "=== gpu tests" | tee -a "$OUT/summary.txt"
PYTHONPATH=$AFTER/proto:$AFTER:/tmp/site timeout 200 python3 -m pytest -m gpu -q tests/test_transport.py -k one_gpu 2>&1 | tail -15 \
  | tee -a "$OUT/summary.txt"
