#!/usr/bin/env bash
# Several GPUs of one host, one process per GPU: NCCL bandwidth between them, then the real
# runtime for data-parallel, DiLoCo, Streaming DiLoCo (fp4) and HALoS (servers on CPU).
#   experiments/gpu_multi.sh OUTDIR
set -uo pipefail
out=$1; mkdir -p "$out"
# NVLink multicast stays off (shared machines; see the device notes)
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
n=$(python -c "import torch; print(torch.cuda.device_count())")
timeout 60 python benchmarks/nccl_bandwidth.py > "$out/bandwidth.txt" 2>&1; cat "$out/bandwidth.txt"
common=(--set cluster.preset=single --set cluster.size=$n --set train.tokens=$((n * 1024000))
        --set train.compile=false --set eval.every=1000000000 --set sample.chars=200 --quiet)
for v in "ddp:--set algorithm.name=ddp" "diloco:--set algorithm.name=diloco" \
         "streaming_fp4:--set algorithm.name=streaming --set algorithm.codec=fp4" \
         "halos:--set algorithm.name=halos --set algorithm.H=8 --set algorithm.K=4"; do
  name=${v%%:*}
  timeout 100 python -m locotrain launch two-datacenters "${common[@]}" ${v#*:} --out "$out/$name" > "$out/$name.log" 2>&1
  python -c "import json; s=json.load(open('$out/$name/summary.json')); print('$name', [round(x*1e3,2) for x in s['step_time_by_worker_s']], 'ms/step', round(s['tokens_per_s']), 'tok/s', s['time_s'], 's', round(s['utilization'],3), 'util', s['bytes_sent'], 'B', s['runtime'])" || tail -5 "$out/$name.log"
done
