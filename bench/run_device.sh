#!/usr/bin/env bash
# The one-call GPU run, from the repository root: bash bench/run_device.sh [part ...]
# Writes CSVs, logs and summary.md under $OUT when set, else bench/results. Budget: under 8 minutes on an H200 (each
# part gets at most its own limit and never more than what is left of $DEADLINE = 440 s, so the run always ends in
# time, start-up included). Default parts: ab check stats. Before it, on the host: bash bench/prepare_baseline.sh REV
# (the kernels to compare against), and carry bench/.baseline to the device.
# Parts, in priority order:
#   ab         A/B of the kernels in one process: baseline (bench/.baseline) against ours, separate and packed QKV,
#              forward and forward+backward, with flex, sdpa (materialised bias) and eager, 7b1 at 2048, 560m/3b
#   check      compiled fwd/bwd/statistics kernels against float64 and eager, real family shapes (bench/gpu_check.py)
#   attention  forward and forward+backward: triton, flex, sdpa, eager (and torch at one shape)
#   stats      the statistics overhead of the fused forward, every family shape at T = 2048
#   optimizer  HeadSlicedAdamW against fused torch AdamW, bloom-7b1 shape, 300 heads, against copy bandwidth
#   step_sr    bloom-7b1 surgery step, 300 heads, seq 512, under a 24 GiB cap, stochastic rounding
#   diagnose   end-to-end diagnosis, bloom-560m shape, T = 2048, eager against triton
#   loss       chunked against full cross-entropy, hidden 4096, T = 2048
#   step_master / paper   the capped step with an fp32 master copy / the paper's full-matrix way (expected: OOM)
# Nothing is installed: the package goes on PYTHONPATH, with the kernels/ mapping the editable install would make.
set -u
[ -e alibi_surgery/kernels ] || ln -s ../kernels alibi_surgery/kernels
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export OUT=${OUT:-$PWD/bench/results}
mkdir -p "$OUT"
DEADLINE=${DEADLINE:-440}
parts=${*:-ab check stats}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"

run() {  # run LIMIT LOG CMD...: at most LIMIT seconds and never past the deadline; output appended to LOG
    local limit=$1 log=$2; shift 2
    local left=$((DEADLINE - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -le 5 ]; then echo "skipped (deadline): $*" | tee -a "$OUT/$log"; return; fi
    echo "+ $* (limit ${limit}s, at ${SECONDS}s)" | tee -a "$OUT/$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
}
step="python3 bench/bench_train_step.py --shape bloom-7b1 --device cuda --dtype bfloat16 --seq 512 --heads 300 --cap-gib 24"
for part in $parts; do
    case $part in
        ab)
            [ -d bench/.baseline/kernels ] || echo "no bench/.baseline/kernels: baseline providers will report an error"
            for op in fwd fwd_bwd; do
                run 110 ab.txt python3 bench/bench_attention_$op.py --shapes bloom-7b1 --seqs 2048 \
                    --providers baseline triton baseline-packed triton-packed flex sdpa eager
                run 70 ab.txt python3 bench/bench_attention_$op.py --shapes bloom-560m bloom-3b --seqs 512 2048 \
                    --providers baseline triton baseline-packed triton-packed flex sdpa
            done ;;
        check) run 120 gpu_check.txt python3 bench/gpu_check.py --quick ;;
        attention)
            for op in fwd fwd_bwd; do
                run 100 attention.txt python3 bench/bench_attention_$op.py --shapes bloom-7b1 --seqs 2048 512 4096 \
                    --providers triton flex sdpa eager
                run 60 attention.txt python3 bench/bench_attention_$op.py --shapes bloom-560m bloom-3b --seqs 2048 \
                    --providers triton flex sdpa eager
                run 30 attention.txt python3 bench/bench_attention_$op.py --shapes bloom-7b1 --seqs 2048 --providers torch
            done ;;
        stats) run 45 stats.txt python3 bench/bench_stats.py --seqs 2048 ;;
        optimizer) run 45 optimizer.txt python3 bench/bench_optimizer.py ;;
        step_sr) run 60 step.txt $step --methods sliced --stochastic-rounding --time-optimizer ;;
        diagnose) run 60 diagnose.txt python3 bench/bench_diagnose.py --device cuda --dtype bfloat16 --seq 2048 \
                      --providers eager triton ;;
        loss) run 40 loss.txt python3 bench/bench_loss.py --device cuda --dtype bfloat16 --hidden 4096 --seq 2048 ;;
        step_master) run 45 step.txt $step --methods sliced --time-optimizer ;;
        paper) run 45 step.txt $step --methods paper ;;
        *) echo "unknown part $part" ;;
    esac
done
echo "run_device.sh: ${SECONDS}s" | tee -a "$OUT/device.txt"
python3 bench/plot.py --summary "$OUT" > "$OUT/summary.md" && cat "$OUT/summary.md"
