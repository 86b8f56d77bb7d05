#!/usr/bin/env bash
# One GPU: (1) rerun DiLoCo with speed-scaled steps on halos-4x4 (after fixing its budget and
# LR schedule), four levels in parallel; (2) then, alone on the GPU, the real runtime with
# several processes sharing it: tokens/s per worker against the simulator's assumption.
#   experiments/gpu_real_runtime.sh OUTDIR
set -uo pipefail
out=$1; mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
ONLY="none/diloco_dylu slight/diloco_dylu moderate/diloco_dylu very/diloco_dylu" \
  experiments/halos_heterogeneity.sh "$out/h" --set train.compile=false
common=(--set cluster.size=2 --set train.tokens=4096000 --set train.compile=false --quiet)
for a in ddp diloco streaming async_local_sgd; do
  python -m locotrain launch two-datacenters --set algorithm.name=$a "${common[@]}" \
      --out "$out/real_$a" > "$out/real_$a.log" 2>&1
  python -c "import json; s=json.load(open('$out/real_$a/summary.json')); print('$a', s['step_time_by_worker_s'], s['tokens_per_s'], s['time_s'], s['final_val_bpc'], s['runtime'])"
done
