#!/usr/bin/env bash
# The one-call GPU run, from the repository root: bash bench/run_device.sh [part ...]
# Writes CSVs, logs and summary.md under $OUT when set, else bench/results. Budget: under 8 minutes on an H200 (each
# part gets at most its own limit and never more than what is left of $DEADLINE = 470 s, so the run always ends in
# time, start-up included). Default parts: check ab stats tune. Before it, on the host: bash bench/prepare_baseline.sh
# REV (the kernels to compare against), and carry bench/.baseline to the device; for tune, the host-side spill check
# of its candidates (bench/tune_candidates.jsonl, python bench/tune_spills.py).
# Parts, in priority order:
#   check      compiled fwd/bwd/statistics kernels against float64 and eager, real family shapes (bench/gpu_check.py)
#   ab         A/B of the kernels in one process: baseline (bench/.baseline) against ours, separate and packed QKV,
#              forward and forward+backward, with flex, sdpa (materialised bias) and eager, 7b1 at 2048, 560m at 512
#   tune       the tile sweep at d = 128 then 64, backward then forward (bench/tune_attention.py), spill-free candidates only
#   attention  forward and forward+backward: triton, flex, sdpa, eager (and torch at one shape)
#   stats      the statistics overhead of the fused forward, every family shape at T = 2048
#   optimizer  HeadSlicedAdamW against fused torch AdamW, bloom-7b1 shape, 300 heads, against copy bandwidth
#   step_sr    bloom-7b1 surgery step, 300 heads, seq 512, under a 24 GiB cap, stochastic rounding
#   diagnose   end-to-end diagnosis, bloom-560m shape, T = 2048, eager against triton
#   loss       chunked against full cross-entropy, hidden 4096, T = 2048
#   step_master / paper   the capped step with an fp32 master copy / the paper's full-matrix way (expected: OOM)
# PACK=1 leaves $OUT as summary.md and results.tgz (the device tool brings back at most 8 files).
# Nothing is installed: the package goes on PYTHONPATH (alibi_surgery/kernels/__init__.py adds the kernels/ folder).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export OUT=${OUT:-$PWD/bench/results}
mkdir -p "$OUT"
DEADLINE=${DEADLINE:-470}
parts=${*:-check ab stats tune}
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
            run 80 ab.txt python3 bench/bench_attention_fwd.py --shapes bloom-7b1 --seqs 2048 \
                --providers baseline triton baseline-packed triton-packed flex sdpa eager
            run 100 ab.txt python3 bench/bench_attention_fwd_bwd.py --shapes bloom-7b1 --seqs 2048 \
                --providers baseline triton baseline-packed triton-packed flex sdpa eager
            for op in fwd fwd_bwd; do
                run 55 ab.txt python3 bench/bench_attention_$op.py --shapes bloom-560m --seqs 512 \
                    --providers baseline triton baseline-packed triton-packed flex sdpa
            done ;;
        check) run 70 gpu_check.txt python3 bench/gpu_check.py --quick ;;
        tune) run 150 tune.txt python3 bench/tune_attention.py --dims 128 64 --kernels bwd fwd \
                  --spill-free bench/tune_candidates.jsonl --deadline $(( (DEADLINE - SECONDS < 150 ? DEADLINE - SECONDS : 150) - 15 )) ;;
        attention)
            for op in fwd fwd_bwd; do
                run 100 attention.txt python3 bench/bench_attention_$op.py --shapes bloom-7b1 --seqs 2048 512 4096 \
                    --providers triton flex sdpa eager
                run 60 attention.txt python3 bench/bench_attention_$op.py --shapes bloom-560m bloom-3b --seqs 2048 \
                    --providers triton flex sdpa eager
                run 30 attention.txt python3 bench/bench_attention_$op.py --shapes bloom-7b1 --seqs 2048 --providers torch
            done ;;
        stats) run 35 stats.txt python3 bench/bench_stats.py --shapes bloom-7b1 bloom-560m --seqs 2048 ;;
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
if [ -n "${PACK:-}" ]; then  # the device tool returns at most 8 files: everything but the summary in one archive
    (cd "$OUT" && tar czf results.tgz --exclude=results.tgz --exclude=summary.md . && \
        find . -type f ! -name results.tgz ! -name summary.md -delete)
fi
