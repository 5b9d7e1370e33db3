#!/usr/bin/env bash
# On a lent GPU machine, from the repository root (nothing installed: the package is put on PYTHONPATH).
# Order is priority: the 24 GiB surgery step first, then kernel correctness, then the comparisons.
set -u
[ -e alibi_surgery/kernels ] || ln -s ../kernels alibi_surgery/kernels   # what the editable install maps
export PYTHONPATH=$PWD
export OUT=${OUT:-$PWD/bench/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
step="python3 bench/bench_train_step.py --shape bloom-7b1 --device cuda --dtype bfloat16 --seq 512 --heads 300 --cap-gib 24"
$step --methods sliced --stochastic-rounding --time-optimizer 2>&1 | tee "$OUT/step_sr.txt"
python3 bench/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt"
$step --methods sliced --time-optimizer 2>&1 | tee "$OUT/step_master.txt"
$step --methods paper 2>&1 | tail -3 | tee "$OUT/step_paper.txt"
