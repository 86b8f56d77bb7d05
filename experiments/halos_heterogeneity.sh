#!/usr/bin/env bash
# The experiment that motivated locotrain: on HALoS's 4x4 cluster, five algorithms at four
# levels of compute heterogeneity (cluster.heterogeneity 0 / 0.25 / 0.5 / 1: the slowest
# worker at 1.0 / 0.78 / 0.56 / 0.118 of the fastest), twenty runs in parallel (each process
# is host-bound, so one GPU holds many). Tables: python experiments/tables.py OUTDIR
#   experiments/halos_heterogeneity.sh OUTDIR [extra --set arguments...]
# ONLY="none/diloco very/halos" runs just those (each run holds ~7 GB of GPU memory).
set -uo pipefail
out=$1; shift; mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
algorithms=(
  "diloco:--set algorithm.name=diloco --set algorithm.dylu=false"
  "diloco_dylu:--set algorithm.name=diloco"
  "async_naive:--set algorithm.name=async_local_sgd --set algorithm.server_optimizer=nesterov --set algorithm.outer_lr=0.04375 --set algorithm.dylu=false"
  "async_dn_dylu:--set algorithm.name=async_local_sgd"
  "halos:--set algorithm.name=halos --set algorithm.H=8"
)
for level in none:0 slight:0.25 moderate:0.5 very:1.0; do
  for a in "${algorithms[@]}"; do
    name=${level%%:*}/${a%%:*}
    [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]] && continue
    mkdir -p "$out/${level%%:*}"
    python -m locotrain run halos-4x4 --quiet --out "$out/$name" ${a#*:} \
        --set cluster.heterogeneity=${level#*:} "$@" > "$out/$name.log" 2>&1 &
  done
done
wait
