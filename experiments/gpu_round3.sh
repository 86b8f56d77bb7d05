#!/usr/bin/env bash
# Parallel runs on one GPU (each process is host-bound; the GPU has room for several):
# an AR regularisation sweep at nanoGPT's size, and the synchronous-family follow-ups on the
# two-datacenters preset (simulated time does not depend on the GPU's load).
#   experiments/gpu_round3.sh OUTDIR
set -uo pipefail
out=$1; mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
run() { name=$1; shift; python -m locotrain run "$@" --quiet --out "$out/$name" > "$out/$name.log" 2>&1; }
run ar_d0.4 shakespeare-char --set model.dropout=0.4 &
run ar_d0.5 shakespeare-char --set model.dropout=0.5 &
run ar_d0.3_wd0.5 shakespeare-char --set model.dropout=0.3 --set train.weight_decay=0.5 &
run ar_d0.35_lr6e-4 shakespeare-char --set model.dropout=0.35 --set train.lr=6e-4 &
for v in "eager H=50 mu0:--set algorithm.name=eager --set algorithm.outer_momentum=0" \
         "naive H=50 mu0:--set algorithm.name=eager --set algorithm.mode=naive --set algorithm.outer_momentum=0" \
         "eager H=100 mu0:--set algorithm.name=eager --set algorithm.H=100 --set algorithm.outer_momentum=0" \
         "naive H=100 mu0:--set algorithm.name=eager --set algorithm.mode=naive --set algorithm.H=100 --set algorithm.outer_momentum=0" \
         "diloco avg:--set algorithm.name=diloco --set algorithm.outer_lr=1 --set algorithm.outer_momentum=0" \
         "overlap:--set algorithm.name=overlap_local_sgd"; do
  name=$(echo "${v%%:*}" | tr ' =' '_-'); args=${v#*:}
  run "2dc_$name" two-datacenters $args &
done
wait
