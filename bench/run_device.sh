#!/usr/bin/env bash
# On a lent GPU machine, from the repository root: bash bench/run_device.sh [part ...]
# Parts, in priority order (default: all): step_sr check step_master paper.
#   step_sr      bloom-7b1 surgery step, 300 heads, seq 512, under a 24 GiB cap, stochastic rounding + optimizer timing
#   check        compiled fwd/bwd kernels against float64 (bench/gpu_check.py) and fwd/bwd timings
#   step_master  the same step with an fp32 master copy
#   paper        the paper's full-matrix way under the same cap (expected: out of memory)
# Nothing is installed: the package goes on PYTHONPATH, with the kernels/ mapping the editable install would make.
set -u
[ -e alibi_surgery/kernels ] || ln -s ../kernels alibi_surgery/kernels
export PYTHONPATH=$PWD
export OUT=${OUT:-$PWD/bench/results}
mkdir -p "$OUT"
parts=${*:-step_sr check step_master paper}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
step="python3 bench/bench_train_step.py --shape bloom-7b1 --device cuda --dtype bfloat16 --seq 512 --heads 300 --cap-gib 24"
for part in $parts; do
    case $part in
        step_sr) $step --methods sliced --stochastic-rounding --time-optimizer 2>&1 | tee "$OUT/step_sr.txt" ;;
        check) python3 bench/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt" ;;
        step_master) $step --methods sliced --time-optimizer 2>&1 | tee "$OUT/step_master.txt" ;;
        paper) $step --methods paper 2>&1 | tail -3 | tee "$OUT/step_paper.txt" ;;
        *) echo "unknown part $part" ;;
    esac
done
