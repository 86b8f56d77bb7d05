#!/usr/bin/env bash
# One GPU call: profile the inner step, sweep AR regularisation at the nanoGPT size (in the
# background: only validation loss matters there), and run the synchronous-family comparison
# on the two-datacenters preset (simulated time does not depend on the GPU's load).
#   benchmarks/gpu_sync_experiments.sh PATH/TO/nanoGPT OUTDIR
set -uo pipefail
nanogpt=$1; out=$2
mkdir -p "$out/sweep"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
python benchmarks/profile_step.py --nanogpt "$nanogpt" > "$out/profile.txt" 2>&1
sweep() { python -m locotrain run shakespeare-char --quiet --out "$out/sweep/$1" "${@:2}" > "$out/sweep/$1.log" 2>&1; }
sweep base &
sweep dropout0.3 --set model.dropout=0.3 &
sweep lr6e-4 --set train.lr=6e-4 &
python -m locotrain compare two-datacenters --quiet --out "$out/cmp" > "$out/compare.log" 2>&1
wait
