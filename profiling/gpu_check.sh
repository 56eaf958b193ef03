#!/usr/bin/env bash
# One call on a lent GPU machine (no network; torch, triton and CuPy already installed there):
# install bn_gpu, run the GPU tests, the benchmark and the host-overhead script, logs under $OUT.
#
#   OUT=/some/dir profiling/gpu_check.sh [bench options...]
#
# Without bench options it measures a subset that fits a few minutes (the full suite compiles
# torch.compile once per case and takes much longer).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-profiling/results/gpu-check}
mkdir -p "$OUT"
{ nvidia-smi; python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())";
  python -c "import cupy; print('cupy', cupy.__version__)"; } > "$OUT/env.txt" 2>&1
pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
# First compiles of the Triton kernels take most of this; --maxfail keeps a broken kernel from
# spending the whole budget on failures.
BN_GPU_REQUIRE_GPU=1 timeout 420 python -m pytest -q --maxfail=20 -m gpu tests -p no:cacheprovider \
    > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests: exit $?" >> "$OUT/env.txt"
timeout 120 python profiling/host_overhead.py > "$OUT/host-overhead.txt" 2>&1
if [ $# -eq 0 ]; then
  set -- --shapes 64x64x112x112 64x2048x7x7 16384x2048 5x3 --dtypes float32 bfloat16
fi
timeout 300 python -m bn_gpu bench --out "$OUT" "$@" > "$OUT/bench.log" 2>&1
echo "bench: exit $?" >> "$OUT/env.txt"
tail -5 "$OUT/gpu-tests.log" "$OUT/bench.log"
