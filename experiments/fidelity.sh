#!/usr/bin/env bash
# The claims of docs/experiments.md's fidelity table, on a corpus that does not overfit
# (`loco corpus build linuxdocs`), long enough for hundreds of outer rounds, with the outer
# optimizer swept instead of fixed at the papers' defaults. Every sweep is one `loco sweep`
# process (its simulations run batched together); all sweeps of the parts asked for run side
# by side on one GPU, and the script returns when every one has finished.
# Memory: the parts async-tuned, halos and diffusion together (13 sweeps started at once) do not
# fit one 140 GB H200: three sweeps died with CUDA out of memory (2026-11-30). Split them, e.g.
# async-tuned on one GPU and halos,diffusion on another, or async-tuned alone.
#
#   experiments/fidelity.sh OUTDIR CORPUS PART[,PART...] [extra --set arguments...]
#   ONLY="c4_naive_half c5_diloco" experiments/fidelity.sh ...   just those sweeps of the parts
#
# PART scaling  claim 1 (Charles et al., arXiv 2503.09799): DiLoCo at M = 1, 2, 4, 8 against
#               data-parallel at equal tokens and equal global batch (64 sequences: each of
#               DiLoCo's M workers takes 64/M), outer lr x momentum swept for each M, inner lr
#               swept for data-parallel.
# PART scaling-lr  the same at DiLoCo's inner lr 4e-3 (outer lr 0.7, 1 x momentum 0, 0.5),
#               data-parallel at 8e-3.
# PART async    claim 4: Async Local-SGD (delayed Nesterov + DyLU, and naive Nesterov) against
#               DiLoCo at M = 4, equal speeds and two workers at half speed.
# PART seeds    the spread over seeds 0-2 of data-parallel (lr 2e-3 and 4e-3; M = 1 x 64 and
#               2 x 32) and of the best DiLoCo setting at M = 1, 2, 4.
# PART overlap  claims 2 and 3 at M = 4 and M = 2: Streaming DiLoCo's codec, tau and alpha
#               against DiLoCo at the same H; the eager-updates ladder (DiLoCo, a one-step
#               overlap = Streaming with one fragment and tau = 1, eager, naive delayed) at
#               H = 15 and 60, outer momentum 0 and 0.5.
# PART overlap-seeds  the spread of claims 2 and 3 (PART overlap has seed 0 only): Streaming
#               fp32 and fp4 at tau 1, alpha 0.5, seeds 1 and 2, and their DiLoCo (M = 4, H = 10,
#               outer 0.7 / 0.5) seeds 0-2; the ladder at outer momentum 0, H = 15 and 60, seeds
#               1 and 2 (with data-parallel).
# PART overlap-tuned  claims 2 and 3 with each method's outer optimizer swept, seed 0: fp4
#               Streaming (M = 4, H = 10, tau 1, alpha 0.5) over outer lr 0.5 / 0.7 / 1.0 x
#               momentum 0 / 0.5 / 0.9, the grid DiLoCo had in PART scaling (its M = 4 cells are
#               DiLoCo's reference); the ladder at M = 2, H = 15 (DiLoCo, eager, naive delayed,
#               the one-step overlap) over outer lr 0.7 / 1.0 x momentum 0 / 0.5.
# PART async-tuned  claim 4 with the server's outer optimizer tuned, M = 4 x 16, inner lr 4e-3,
#               H = 10, on equal speeds and with two of the four workers at half speed (DyLU:
#               they run 5 steps per task): delayed Nesterov, outer lr 0.7 / 1.0 / 1.4 x
#               momentum 0 / 0.5 (seed 0; N = 4, so each arrival moves lr/4 of its delta);
#               seeds 1 and 2 of (1.0, 0), the cell picked before running (claim 1's best
#               DiLoCo outer setting); naive per-arrival Nesterov at lr 0.25 = 1.0/4, momentum
#               0.5 (the same step size as delayed (1.0, 0.5); at momentum 0 the two are the
#               same rule); synchronous DiLoCo + DyLU with the half-speed workers, seeds 0-2.
#               The tuned DiLoCo reference (outer 1.0, 0) is PART seeds' seeds_diloco_M4
#               (DiLoCo without DyLU computes the same model at either speed).
# PART halos    claim 5 on HALoS's cluster (cluster preset halos-4x4: 16 workers in 4 regions,
#               speeds 0.118-1, 0.117-0.935 Gbit/s between regions), 16 x 8 sequences,
#               inner lr 4e-3, the same 32.8M tokens, 0.05 s per step at speed 1 (the model's
#               12.8 MB cross the slowest link in 0.9 s), 20 evaluations; seeds 0 and 1 of
#               every cell: HALoS (H = 8 with DyLU, K = 8) with local momentum 0 / 0.9 x
#               global lr 0.3 / 0.6 (local lr 3.2 over N = 16, global momentum 0.5, weight
#               0.25, as HALoS's example); Async Local-SGD (delayed Nesterov + DyLU, H = 10,
#               N = 16) at outer lr 1.0, momentum 0 / 0.5; DiLoCo (H = 10, outer 1.0, 0) with
#               and without DyLU, its all-reduce timed hierarchically (within each region,
#               then a ring of the 4 region leaders: the faster schedule on this cluster).
# PART diffusion  claim 6, one worker, batch 64 x 256, lr 4e-3: the AR model (seeds 0-2);
#               masked diffusion (MDLM bound, 8 mask draws per window in evaluation) at lr
#               2e-3 / 4e-3 (seeds 0, 1); masked diffusion + Loopholing at the same tokens and
#               at the same training FLOPs (3/4 of the tokens: its no-gradient first pass
#               costs a third of a training pass), seeds 0, 1. AR and diffusion share the
#               backbone, so equal tokens is equal FLOPs for them; Loopholing's runs get 4/3 of
#               the step time, so simulated time counts training FLOPs in every run.
# Tables and figures: python experiments/fidelity_tables.py OUTDIR [--img docs/img]
set -uo pipefail
out=$1; corpus=$2; part=$3; shift 3; mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
# A dozen sweeps side by side: each compiles its training step and optimizer in its own process,
# without a pool of compile workers per process (a pool each would hold ~16 processes).
export TORCHINDUCTOR_COMPILE_THREADS=1
# 4 x 256 char GPT (3.2M parameters), context 256; 2000 steps of 64 x 256 tokens = 32.8M
# tokens (about 1.2 passes over the corpus's training split); H = 10: 200 outer rounds.
common=(--set data.path="$corpus" --set model.depth=4 --set model.width=256 --set model.heads=4
        --set model.seq_len=256 --set train.tokens=32768000 --set train.lr=2e-3
        --set train.compile=true --set eval.windows=200 --set eval.every=3276800
        --set sample.chars=20 --set cluster.preset=two-datacenters --set cluster.step_time_s=0.05 "$@")

# The token budget, as the extra arguments may set it (a short smoke run): the parts that
# derive settings from it (Loopholing's equal-FLOPs run, claim 5's evaluation interval) follow.
tokens=32768000
for a in "$@"; do [[ $a == train.tokens=* ]] && tokens=${a#train.tokens=}; done
# Two workers in dc0 at full speed and two in dc1 at half speed; 1 Gbit/s, 30 ms between.
hetero=(--set cluster.preset=custom --set "cluster.regions=['dc0', 'dc1']"
        --set "cluster.latency_s=[[0.0001, 0.03], [0.03, 0.0001]]"
        --set "cluster.bandwidth_gbps=[[100.0, 1.0], [1.0, 100.0]]"
        --set "cluster.workers=[{region='dc0', count=2}, {region='dc1', count=2, speed=0.5}]")

sweep() {  # name, then loco sweep arguments; the log ends with when the sweep finished
  local name=$1; shift
  # ONLY="name name ..." runs just those sweeps of the parts asked for (a rerun of some cells)
  [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]] && return 0
  ( python -m locotrain sweep quickstart --quiet --force --out "$out/$name" "${common[@]}" "$@"
    echo "exit code $?, finished ${SECONDS} s after the script started" ) > "$out/$name.log" 2>&1 &
}

for p in ${part//,/ }; do  # every part's name checked before anything starts
  case $p in scaling|scaling-lr|seeds|async|overlap|overlap-seeds|overlap-tuned|async-tuned|halos|diffusion) ;;
  *) echo "PART is scaling, scaling-lr, seeds, async, overlap, overlap-seeds, overlap-tuned," \
          "async-tuned, halos" \
          "or diffusion" \
          "(or several, comma-separated), got '$p'" >&2; exit 2 ;;
  esac
done
for part in ${part//,/ }; do
case $part in
scaling)
  sweep ddp --set algorithm.name=ddp --set cluster.preset=single --set cluster.size=1 --set train.batch_size=64 \
      --grid train.lr=1e-3,2e-3,4e-3
  for M in 1 2 4 8; do
    sweep diloco_M$M --set algorithm.name=diloco --set algorithm.H=10 --set cluster.preset=single \
        --set cluster.size=$M \
        --set train.batch_size=$((64 / M)) \
        --grid algorithm.outer_lr=0.5,0.7,1.0 --grid algorithm.outer_momentum=0,0.5,0.9
  done ;;
scaling-lr)  # the same at inner lr 4e-3 (data-parallel's best in the first sweep) and DDP at 8e-3
  sweep ddp_lr8e-3 --set algorithm.name=ddp --set cluster.preset=single --set cluster.size=1 \
      --set train.batch_size=64 --grid train.lr=8e-3
  for M in 1 2 4 8; do
    sweep diloco_lr4e-3_M$M --set algorithm.name=diloco --set algorithm.H=10 \
        --set cluster.preset=single --set cluster.size=$M --set train.batch_size=$((64 / M)) \
        --set train.lr=4e-3 --grid algorithm.outer_lr=0.7,1.0 --grid algorithm.outer_momentum=0,0.5
  done ;;
seeds)  # the spread: the key cells again with seeds 0, 1, 2 (seed 0 repeats the run above)
  sweep seeds_ddp_M1 --set algorithm.name=ddp --set cluster.preset=single --set cluster.size=1 \
      --set train.batch_size=64 --grid train.lr=2e-3,4e-3 --seeds 3
  sweep seeds_ddp_M2 --set algorithm.name=ddp --set cluster.size=2 --set train.batch_size=32 \
      --seeds 3
  for M in 1 2 4; do
    sweep seeds_diloco_M$M --set algorithm.name=diloco --set algorithm.H=10 \
        --set cluster.preset=single --set cluster.size=$M --set train.batch_size=$((64 / M)) \
        --set train.lr=4e-3 --set algorithm.outer_lr=1.0 --set algorithm.outer_momentum=0 --seeds 3
  done ;;
async)  # claim 4, M = 4 x 16, inner lr 4e-3: DiLoCo (outer 1.0, 0, claim 1's best) against
  # Async Local-SGD with delayed Nesterov + DyLU (its defaults) and the naive asynchronous
  # Nesterov, on equal speeds and with two of the four workers at half speed
  for speeds in equal half; do
    extra=(); [[ $speeds == half ]] && extra=("${hetero[@]}")
    sweep async_diloco_$speeds --set algorithm.name=diloco --set algorithm.H=10 \
        --set cluster.size=4 --set train.batch_size=16 --set train.lr=4e-3 \
        --set algorithm.outer_lr=1.0 --set algorithm.outer_momentum=0 "${extra[@]}" --grid train.seed=0
    sweep async_async_$speeds --set algorithm.name=async_local_sgd --set algorithm.H=10 \
        --set cluster.size=4 --set train.batch_size=16 --set train.lr=4e-3 "${extra[@]}" \
        --grid algorithm.server_optimizer=delayed_nesterov,nesterov
  done ;;
overlap)
  # claim 2, M = 4, H = 10 as claim 1's DiLoCo; 2 fragments of 2 blocks
  sweep streaming --set algorithm.name=streaming --set algorithm.H=10 --set cluster.size=4 \
      --set train.batch_size=16 --set algorithm.fragments=2 --set algorithm.outer_lr=0.7 \
      --set algorithm.outer_momentum=0.5 \
      --grid algorithm.codec=fp32,fp4 --grid algorithm.tau=1,4 --grid algorithm.alpha=0,0.5
  # claim 3, M = 2 (the eager paper's setting)
  for a in diloco eager; do
    extra=(); [[ $a == eager ]] && extra=(--grid algorithm.mode=eager,naive)
    sweep ladder_$a --set algorithm.name=$a --set cluster.size=2 --set train.batch_size=32 \
        --set algorithm.outer_lr=0.7 --grid algorithm.H=15,60 --grid algorithm.outer_momentum=0,0.5 \
        "${extra[@]}"
  done
  sweep ladder_overlap1 --set algorithm.name=streaming --set cluster.size=2 \
      --set train.batch_size=32 --set algorithm.fragments=1 --set algorithm.tau=1 \
      --set algorithm.alpha=0 --set algorithm.outer_lr=0.7 \
      --grid algorithm.H=15,60 --grid algorithm.outer_momentum=0,0.5
  sweep ladder_ddp --set algorithm.name=ddp --set cluster.size=2 --set train.batch_size=32 \
      --grid train.seed=0 ;;
overlap-seeds)  # claims 2 and 3 again with more seeds (see the header)
  sweep streaming_seeds --set algorithm.name=streaming --set algorithm.H=10 --set cluster.size=4 \
      --set train.batch_size=16 --set algorithm.fragments=2 --set algorithm.outer_lr=0.7 \
      --set algorithm.outer_momentum=0.5 --set algorithm.tau=1 --set algorithm.alpha=0.5 \
      --grid algorithm.codec=fp32,fp4 --set train.seed=1 --seeds 2
  sweep streaming_seeds_diloco --set algorithm.name=diloco --set algorithm.H=10 \
      --set cluster.size=4 --set train.batch_size=16 --set algorithm.outer_lr=0.7 \
      --set algorithm.outer_momentum=0.5 --seeds 3
  for a in diloco eager; do
    extra=(); [[ $a == eager ]] && extra=(--grid algorithm.mode=eager,naive)
    sweep ladder_seeds_$a --set algorithm.name=$a --set cluster.size=2 --set train.batch_size=32 \
        --set algorithm.outer_lr=0.7 --set algorithm.outer_momentum=0 --grid algorithm.H=15,60 \
        "${extra[@]}" --set train.seed=1 --seeds 2
  done
  sweep ladder_seeds_overlap1 --set algorithm.name=streaming --set cluster.size=2 \
      --set train.batch_size=32 --set algorithm.fragments=1 --set algorithm.tau=1 \
      --set algorithm.alpha=0 --set algorithm.outer_lr=0.7 --set algorithm.outer_momentum=0 \
      --grid algorithm.H=15,60 --set train.seed=1 --seeds 2
  sweep ladder_seeds_ddp --set algorithm.name=ddp --set cluster.size=2 --set train.batch_size=32 \
      --set train.seed=1 --seeds 2 ;;
overlap-tuned)  # claims 2 and 3 with each method's outer optimizer swept (see the header)
  sweep tuned_streaming_fp4 --set algorithm.name=streaming --set algorithm.H=10 \
      --set cluster.size=4 --set train.batch_size=16 --set algorithm.fragments=2 \
      --set algorithm.codec=fp4 --set algorithm.tau=1 --set algorithm.alpha=0.5 \
      --grid algorithm.outer_lr=0.5,0.7,1.0 --grid algorithm.outer_momentum=0,0.5,0.9
  for a in diloco eager overlap1; do
    case $a in
      diloco) alg=(--set algorithm.name=diloco) ;;
      eager) alg=(--set algorithm.name=eager --grid algorithm.mode=eager,naive) ;;
      overlap1) alg=(--set algorithm.name=streaming --set algorithm.fragments=1
                     --set algorithm.tau=1 --set algorithm.alpha=0) ;;
    esac
    sweep tuned_ladder_$a "${alg[@]}" --set cluster.size=2 --set train.batch_size=32 \
        --set algorithm.H=15 --grid algorithm.outer_lr=0.7,1.0 --grid algorithm.outer_momentum=0,0.5
  done ;;
async-tuned)  # claim 4 with the server's outer lr and momentum swept (see the header)
  for speeds in equal half; do
    extra=(); [[ $speeds == half ]] && extra=("${hetero[@]}")
    base=(--set algorithm.name=async_local_sgd --set algorithm.H=10 --set cluster.size=4
          --set train.batch_size=16 --set train.lr=4e-3 "${extra[@]}")
    sweep c4_dn_$speeds "${base[@]}" \
        --grid algorithm.outer_lr=0.7,1.0,1.4 --grid algorithm.outer_momentum=0,0.5
    sweep c4_seeds_$speeds "${base[@]}" --set algorithm.outer_lr=1.0 \
        --set algorithm.outer_momentum=0 --set train.seed=1 --seeds 2
    sweep c4_naive_$speeds "${base[@]}" --set algorithm.server_optimizer=nesterov \
        --set algorithm.outer_lr=0.25 --grid algorithm.outer_momentum=0.5
  done
  sweep c4_dylu_half --set algorithm.name=diloco --set algorithm.H=10 --set algorithm.dylu=true \
      --set cluster.size=4 --set train.batch_size=16 --set train.lr=4e-3 \
      --set algorithm.outer_lr=1.0 --set algorithm.outer_momentum=0 "${hetero[@]}" --seeds 3 ;;
halos)  # claim 5 on HALoS's 4 x 4 cluster, every cell with seeds 0 and 1 (see the header)
  h=(--set cluster.preset=halos-4x4 --set cluster.size=16 --set train.batch_size=8
     --set train.lr=4e-3 --set eval.every=$((tokens / 20)))
  sweep c5_halos "${h[@]}" --set algorithm.name=halos --set algorithm.H=8 --set algorithm.K=8 \
      --grid algorithm.local_momentum=0,0.9 --grid algorithm.global_lr=0.3,0.6 --seeds 2
  sweep c5_async "${h[@]}" --set algorithm.name=async_local_sgd --set algorithm.H=10 \
      --set algorithm.outer_lr=1.0 --grid algorithm.outer_momentum=0,0.5 --seeds 2
  sweep c5_diloco "${h[@]}" --set algorithm.name=diloco --set algorithm.H=10 \
      --set algorithm.outer_lr=1.0 --set algorithm.outer_momentum=0 \
      --set cluster.allreduce=hierarchical --grid algorithm.dylu=false,true --seeds 2 ;;
diffusion)  # claim 6: AR against masked diffusion, with and without Loopholing (see the header)
  d=(--set algorithm.name=ddp --set cluster.preset=single --set cluster.size=1
     --set train.batch_size=64 --set train.lr=4e-3 --set eval.samples=8 --set eval.batch_size=512)
  sweep c6_ar "${d[@]}" --seeds 3
  sweep c6_mdlm "${d[@]}" --set workload.name=masked_diffusion --grid train.lr=2e-3,4e-3 --seeds 2
  # 0.05 s x 4/3 per step: the simulated time of every run of the part is its training FLOPs
  sweep c6_loop "${d[@]}" --set workload.name=masked_diffusion --set workload.loopholing=true \
      --set cluster.step_time_s=0.0666667 --grid train.tokens=$tokens,$((tokens * 3 / 4)) --seeds 2 ;;
esac
done
wait
grep -il "error\|traceback" "$out"/*.log && exit 1
exit 0
