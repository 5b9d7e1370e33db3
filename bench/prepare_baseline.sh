#!/usr/bin/env bash
# Export the kernels of an earlier commit for the A/B providers of bench/attention.py:
#   bash bench/prepare_baseline.sh REV      ->  bench/.baseline/kernels (git-ignored; carry it to the device)
set -eu
rev=${1:?usage: bench/prepare_baseline.sh REV}
rm -rf bench/.baseline
mkdir -p bench/.baseline
git archive "$rev" kernels | tar -x -C bench/.baseline
echo "bench/.baseline/kernels: the kernels of $(git rev-parse --short "$rev")"
