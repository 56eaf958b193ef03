#!/usr/bin/env bash
# Run the GPU test subset under compute-sanitizer (memcheck, racecheck, initcheck) for each backend:
# the split and single-pass kernels of both layouts (test_kernels, test_numerics: on every kernel
# path, the on-chip one included), the on-chip kernels' own tests (Triton's and CUDA C's) and Ghost
# BatchNorm's kernels (test_ghost).
#
#   profiling/sanitize.sh [pytest -k expression]
#
# Each tool runs pytest on the GPU parity tests of one backend with small shapes; a report with
# errors fails the script. compute-sanitizer ships with the CUDA toolkit (e.g. /usr/local/cuda/bin).
# Triton compiles kernels on first use: the first run of each is slow under the sanitizer.
set -uo pipefail
cd "$(dirname "$0")/.."
expr=${1:-"not large and not two_to_the_31"}
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
status=0
for backend in triton cupy; do
  for tool in memcheck racecheck initcheck; do
    echo "== compute-sanitizer --tool $tool, backend $backend"
    "$sanitizer" --tool "$tool" --error-exitcode 99 --target-processes all \
      python -m pytest -q -x -p no:cacheprovider tests/kernels/test_kernels.py tests/test_numerics.py \
      tests/kernels/test_on_chip.py tests/backends/test_cuda_on_chip.py tests/kernels/test_ghost.py \
      -k "${backend}-cuda and ($expr)" || status=1
  done
done
exit $status
