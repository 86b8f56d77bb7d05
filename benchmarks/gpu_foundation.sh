#!/usr/bin/env bash
# The foundation benchmark on one GPU: nanoGPT's shakespeare_char run, then ours (AR and
# masked diffusion) at the same size and budget. Usage (on the GPU machine):
#   benchmarks/gpu_foundation.sh PATH/TO/nanoGPT OUTDIR
set -uo pipefail
nanogpt=$1; out=$2
mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$out/env.txt"
python benchmarks/nanogpt_compare.py --nanogpt "$nanogpt" --out "$out/bench" ${ONLY:+--only $ONLY}
