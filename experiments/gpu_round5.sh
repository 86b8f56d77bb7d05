#!/usr/bin/env bash
# Device calls of 2 H200s (2026-11-30), results under $OUT:
#   bash experiments/gpu_round5.sh fidelity   the three fidelity sweeps that ran out of memory in
#                                             gpu_round4.sh, split over the two GPUs
#   bash experiments/gpu_round5.sh fidelity-seeds   claims 2 and 3 with seeds 1 and 2
#   bash experiments/gpu_round5.sh fidelity-tuned   claims 2 and 3 with the outer optimizer swept
#   bash experiments/gpu_round5.sh pipeline   2BP against plain 1F1B again, after the fix of the
#                                             stash path's leak (benchmarks/pipeline_2bp.py)
#   bash experiments/gpu_round5.sh pipeline-shapes   the same at other shapes and over gloo
#   bash experiments/gpu_round5.sh pipeline-rounds   those shapes again, 3 interleaved rounds each
#   bash experiments/gpu_round5.sh pipeline-wide     a wide model (8 x 2048), 3 interleaved rounds
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1
S=$SECONDS

split() {  # PART0 "SWEEPS0" PART1 "SWEEPS1": fidelity.sh sweeps, one set on each GPU, then
  # their results in $OUT/fid.tgz (deep folders do not come back from the device)
  ONLY="$2" CUDA_VISIBLE_DEVICES=0 timeout 540 \
      bash experiments/fidelity.sh /tmp/fid .corpus/linuxdocs.txt "$1" > $OUT/fid0.log 2>&1 &
  ONLY="$4" CUDA_VISIBLE_DEVICES=1 timeout 540 \
      bash experiments/fidelity.sh /tmp/fid .corpus/linuxdocs.txt "$3" > $OUT/fid1.log 2>&1 &
  wait
  echo "sweeps done at $((SECONDS-S))s"
  (cd /tmp && find fid \( -name config.toml -o -name summary.json -o -name metrics.jsonl \
      -o -name '*.md' -o -name '*.log' \) | tar czf $OUT/fid.tgz -T -)
  tail -n 3 /tmp/fid/*.log
}

rounds() {  # NAME LIMIT_S ARGS...: benchmarks/pipeline_2bp.py, variants 3 times interleaved
  local name=$1 limit=$2; shift 2
  timeout "$limit" python benchmarks/pipeline_2bp.py --rounds 3 --json $OUT/rounds_$name.json "$@" \
      > $OUT/rounds_$name.log 2>&1; echo "$name rc=$? at $((SECONDS-S))s"
}

case $1 in
fidelity)
  split async-tuned "c4_naive_half c4_seeds_half" halos "c5_diloco" ;;
fidelity-seeds)  # claims 2 and 3's spread (fidelity.sh's PART overlap-seeds)
  split overlap-seeds "streaming_seeds streaming_seeds_diloco ladder_seeds_ddp" \
        overlap-seeds "ladder_seeds_diloco ladder_seeds_eager ladder_seeds_overlap1" ;;
fidelity-tuned)  # claims 2 and 3 with the outer optimizer swept (fidelity.sh's overlap-tuned)
  split overlap-tuned "tuned_streaming_fp4" \
        overlap-tuned "tuned_ladder_diloco tuned_ladder_eager tuned_ladder_overlap1" ;;
pipeline)
  timeout 260 python benchmarks/pipeline_2bp.py --models 6x384 --json $OUT/pipeline_2bp_6x384.json \
      > $OUT/pipeline_2bp_6x384.log 2>&1
  echo "6x384 rc=$? at $((SECONDS-S))s"
  timeout $((570 - (SECONDS-S))) python benchmarks/pipeline_2bp.py --models 24x384 \
      --json $OUT/pipeline_2bp_24x384.json > $OUT/pipeline_2bp_24x384.log 2>&1
  echo "24x384 rc=$? at $((SECONDS-S))s"
  tail -n 20 $OUT/pipeline_2bp_*.log ;;
pipeline-shapes)  # where 2BP could pay: fewer micro-batches (a larger bubble), larger kernels,
  # and the host-staged gloo link (messages cost more)
  run() { local name=$1; shift
    timeout 150 python benchmarks/pipeline_2bp.py --json $OUT/pipeline_2bp_$name.json "$@" \
        > $OUT/pipeline_2bp_$name.log 2>&1; echo "$name rc=$? at $((SECONDS-S))s"; }
  run 24x384_m4_b64 --models 24x384 -m 4 --micro-batch 64 --schedules 1f1b,gpipe
  run 24x384_m2_b64 --models 24x384 -m 2 --micro-batch 64
  run 24x384_gloo --models 24x384 --transport gloo
  run 6x384_gloo --models 6x384 --transport gloo
  grep -h -A4 "model run" $OUT/pipeline_2bp_*_*.log ;;
pipeline-rounds)  # the same shapes, every list of variants 3 times interleaved (step times
  # drifted by up to 40% within one run above)
  rounds 6x384 200 --models 6x384
  rounds 24x384_m4_b64 200 --models 24x384 -m 4 --micro-batch 64
  rounds 24x384_m2_b64 200 --models 24x384 -m 2 --micro-batch 64
  rounds 24x384 200 --models 24x384
  rounds 24x384_gloo 200 --models 24x384 --transport gloo
  grep -h -A4 "model run" $OUT/rounds_*.log ;;
pipeline-wide)  # kernels large enough to leave the host-bound regime: 8 x 2048 (403M parameters)
  rounds 8x2048_m4_b16 250 --models 8x2048 -m 4 --micro-batch 16
  rounds 8x2048_m8_b16 250 --models 8x2048 -m 8 --micro-batch 16
  grep -h -A4 "model run" $OUT/rounds_*.log ;;
*) echo "usage: bash experiments/gpu_round5.sh fidelity|fidelity-seeds|fidelity-tuned|pipeline|pipeline-shapes|pipeline-rounds|pipeline-wide" >&2
   exit 2 ;;
esac
