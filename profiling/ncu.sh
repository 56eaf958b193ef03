#!/usr/bin/env bash
# Profile one benchmark case under Nsight Compute.
#
#   profiling/ncu.sh [SHAPE] [DTYPE] [MODE] [IMPL] [extra ncu options...]
#   profiling/ncu.sh 64x64x112x112 float32 train_fwd bn_gpu-triton
#
# Writes profiling/results/ncu-<case>.ncu-rep (open with ncu-ui, or `ncu --import FILE --page details`).
# Kernels are profiled after a warm-up, once each (--launch-skip / --launch-count below); add
# `--set full` for every section.
set -euo pipefail
cd "$(dirname "$0")/.."
shape=${1:-64x64x112x112}
dtype=${2:-float32}
mode=${3:-train_fwd}
impl=${4:-bn_gpu-triton}
shift $(( $# < 4 ? $# : 4 ))
mkdir -p profiling/results
out="profiling/results/ncu-${impl}-${shape}-${dtype}-${mode}"
exec ncu --clock-control none --target-processes all --launch-skip 50 --launch-count 10 --export "$out" --force-overwrite "$@" \
    python -m bn_gpu bench --shapes "$shape" --dtypes "$dtype" --modes "$mode" --impls "$impl" \
    --out profiling/results/ncu-runs
