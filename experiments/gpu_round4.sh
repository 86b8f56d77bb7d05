#!/usr/bin/env bash
# One device call of 2 H200s (2026-11-30): the quickstart on 2 GPUs for the planner's
# prediction (benchmarks/plan_vs_real.py), then side by side: CUDA graphs and batched
# evaluation (benchmarks/cuda_graphs.py) on GPU 0, fidelity claims 4-6 on GPU 1.
#   bash experiments/gpu_round4.sh   (results under $OUT)
# As run on 2026-11-30, three of fidelity's thirteen sweeps (c4_naive_half, c4_seeds_half,
# c5_diloco) ran out of GPU memory: the three parts do not fit one GPU when every sweep
# starts at once. Split them over GPUs before rerunning.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1
S=$SECONDS
timeout 90 python -m locotrain launch quickstart --nproc 2 --quiet --out /tmp/q2gpu > $OUT/q2gpu.log 2>&1
echo "q2gpu rc=$? at $((SECONDS-S))s"
(cd /tmp && tar czf $OUT/q2gpu.tgz --exclude=model.safetensors --exclude=plots q2gpu)
CUDA_VISIBLE_DEVICES=0 timeout 450 python benchmarks/cuda_graphs.py --json $OUT/cuda_graphs.json > $OUT/cuda_graphs.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 480 bash experiments/fidelity.sh /tmp/fid .corpus/linuxdocs.txt async-tuned,halos,diffusion > $OUT/fid_driver.log 2>&1 &
wait
echo "both done at $((SECONDS-S))s"
(cd /tmp && find fid \( -name config.toml -o -name summary.json -o -name metrics.jsonl -o -name '*.md' -o -name '*.log' \) | tar czf $OUT/fid.tgz -T -)
tail -25 $OUT/cuda_graphs.log
ls -la $OUT
