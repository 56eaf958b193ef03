#!/usr/bin/env bash
# One time-boxed call on a GPU machine (no network; torch, triton and CuPy already there):
# install bn_gpu, compile the CuPy modules, the GPU tests (and a preflight of every kernel where they
# fail), the host overhead, every kernel's time per op and the benchmark, each step under its own
# timeout inside one budget of wall time (default 480 s).
#
#   profiling/gpu_check.sh [--budget-s 480] [--out DIR] [--rehearse] [--skip-preflight] [-- bench options...]
#
# --rehearse  on a CPU machine: the same steps and budget logic with the GPU steps stubbed (the
#             preflight in the Triton interpreter, the benchmark as --smoke, no install), to check
#             that the budget holds and that results are written as the run goes.
# For tests of the budget logic, two variables replace what takes real time: GPU_CHECK_CLOCK, a file
# holding the seconds elapsed (read instead of bash's SECONDS), and GPU_CHECK_STUB, a command run as
# `STUB NAME LIMIT` in place of each step's command (its exit status is the step's).
# Every step writes its log as it runs, and the benchmark rewrites its JSON/CSV/Markdown after
# every job, so a step cut off by its timeout loses nothing already measured. The last lines
# printed (also DIR/summary.md) are what to paste into profiling/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
budget=480
out=profiling/results/gpu-check
rehearse=0
preflight=1
while [ $# -gt 0 ]; do
  case "$1" in
    --budget-s) budget=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --rehearse) rehearse=1; shift ;;
    --skip-preflight) preflight=0; shift ;;
    --) shift; break ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$out/bench"
summary="$out/summary.md"
# Seconds since some fixed point: bash's SECONDS, or the test clock's file.
now() { if [ -n "${GPU_CHECK_CLOCK:-}" ]; then cat "$GPU_CHECK_CLOCK"; else echo "$SECONDS"; fi; }
start=$(now)
PY=${PYTHON:-python3}
compile_cupy='
import concurrent.futures, multiprocessing
from bn_gpu.backends.cupy import compilation
def compile_one(types):
    kernels = compilation.compiled_kernels(0, *types)
    for role in compilation.kernel_modules(*types)[1]:  # the on-chip module, compiled on first use
        kernels[role]
    return types
if __name__ == "__main__":
    pool = concurrent.futures.ProcessPoolExecutor(mp_context=multiprocessing.get_context("fork"))
    for types in pool.map(compile_one, compilation.type_combinations()):
        print("compiled", *types, flush=True)
'

: > "$summary"

# Seconds left in the budget, less a reserve of PERCENT of the budget for the steps after this one.
left() { echo $(( budget - ($(now) - start) - budget * ${1:-0} / 100 )); }

# step NAME MAX_SECONDS RESERVE_PERCENT COMMAND...: run COMMAND with a timeout of MAX_SECONDS or
# what the budget leaves after its reserve for later steps, whichever is less; log to $out/NAME.log.
step() {
  local name=$1 most=$2 reserve=$3
  shift 3
  local limit
  limit=$(left "$reserve")
  [ "$limit" -gt "$most" ] && limit=$most
  if [ "$limit" -lt 5 ]; then
    echo "- $name: not run (budget spent)" >> "$summary"
    return
  fi
  local t0
  t0=$(now)
  if [ -n "${GPU_CHECK_STUB:-}" ]; then
    "$GPU_CHECK_STUB" "$name" "$limit" > "$out/$name.log" 2>&1
  else
    # SIGINT first: pytest and the benchmark print what they have before they stop.
    timeout -s INT -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  fi
  local status=$?
  local verdict="exit $status"
  [ $status -eq 124 ] || [ $status -eq 130 ] && verdict="stopped at its ${limit} s limit (exit $status)"
  echo "- $name: $verdict, $(( $(now) - t0 )) s of ${limit} s" >> "$summary"
}

if [ $rehearse -eq 1 ]; then
  export TRITON_INTERPRET=1
  device="CPU rehearsal (GPU steps stubbed)"
  { echo "rehearsal on $(uname -n)"; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    > "$out/env.log" 2>&1
  echo "- install: skipped (rehearsal)" >> "$summary"
  step preflight 30 40 "$PY" -m bn_gpu preflight
  echo "- cupy-compile: skipped (rehearsal: no CuPy)" >> "$summary"
  step gpu-tests 20 40 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider -rfE
  bench_limit=$(left 15)
  step bench "$bench_limit" 15 "$PY" -m bn_gpu bench --smoke --out "$out/bench" --budget-s $(( bench_limit - 10 )) "$@"
  step host-overhead 10 10 bash -c '"$1" profiling/host_overhead.py --stub-kernels --calls 200 &&
    "$1" profiling/host_overhead.py --stub-kernels --breakdown --steps 200' host-overhead "$PY"
  step train-step 15 0 "$PY" profiling/train_step.py --smoke --out "$out/train-step"
else
  device=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
  { nvidia-smi; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())";
    "$PY" -c "import cupy; print('cupy', cupy.__version__)"; } > "$out/env.log" 2>&1
  step install 60 80 "$PY" -m pip install --no-deps --no-build-isolation -e .
  # Every CuPy module (one per type combination) compiled once, side by side, into CuPy's disk
  # cache: otherwise each test worker compiles the ones it needs itself (70-80 s a worker in run 7).
  step cupy-compile 90 60 "$PY" -c "$compile_cupy"
  workers=()
  "$PY" -c "import xdist" 2>/dev/null && workers=(-n 12)
  BN_GPU_REQUIRE_GPU=1 step gpu-tests 240 35 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider -rfE \
    --durations=10 "${workers[@]}"
  # The preflight (one line per kernel family and dtype) only where the tests failed: a failure's
  # first reading. It repeats what the tests check, so a green run skips it.
  if [ $preflight -eq 1 ] && grep -q -E '^(FAILED|ERROR) |[0-9]+ (failed|error)' "$out/gpu-tests.log"; then
    step preflight 90 30 "$PY" -m bn_gpu preflight
  else
    echo "- preflight: skipped ($([ $preflight -eq 1 ] && echo 'the GPU tests passed' || echo '--skip-preflight'))" >> "$summary"
  fi
  # Host time per call; where a training step's host time goes (cProfile of forward+backward); and
  # a step's host time in four intervals: forward, hand-off to the backward, backward, hand-off back.
  step host-overhead 30 30 bash -c '"$1" profiling/host_overhead.py --calls 1000 --profile "bn_gpu module, fwd+bwd" &&
    "$1" profiling/host_overhead.py --breakdown --steps 1000' host-overhead "$PY"
  # The same with every Triton launch through the JIT (BN_GPU_DIRECT_LAUNCH=0), for comparison.
  BN_GPU_DIRECT_LAUNCH=0 step host-overhead-jit 30 25 "$PY" profiling/host_overhead.py --calls 1000
  # Every kernel's time per op on the large shapes: where the GPU time goes (run 6: ~25 s without the
  # backward through the ReLU's recomputed mask and Ghost BatchNorm's kernels, which no other step times).
  step kernel-times 60 20 "$PY" profiling/kernel_times.py --ops train_fwd backward backward_relu ghost_fwd ghost_bwd
  # The on-chip kernels (x read once) against the two-pass plans they replace, on inputs both
  # backends hold on chip, and the walks over channel groups (64x2048x7x7 forward and backward)
  # against the single pass (the two-pass plans: BN_GPU_TUNING=on_chip_bytes=0, in a process of its own);
  # 64x440x7x7: channel groups whose batch rows the JIT cannot see aligned (ALIGN).
  step kernel-times-on-chip 40 15 bash -c '"$1" profiling/kernel_times.py $2 &&
    BN_GPU_TUNING=on_chip_bytes=0 "$1" profiling/kernel_times.py $2' kernel-times-on-chip "$PY" \
    "--shapes 32x128x14x14 32x256x14x14 16x256x28x28 64x2048x7x7 64x440x7x7 --ops train_fwd backward"
  # Whole-model training steps against torch.nn (profiling/train_step.py): channels_last bf16, every
  # implementation eager, then under CUDA graphs, then torch.compile; rows are written as they end.
  ts_limit=$(left 10)
  [ "$ts_limit" -gt 120 ] && ts_limit=120
  step train-step "$ts_limit" 10 "$PY" profiling/train_step.py --models resnet50 resnet18 --batch-sizes 32 256 \
    --layouts channels_last --precisions bf16 --impls torch bn_gpu-triton bn_gpu-triton-fused \
    --modes eager cudagraph compile --steps 10 --budget-s $(( ts_limit > 40 ? ts_limit - 30 : 10 )) \
    --out "$out/train-step"
  if [ $# -eq 0 ]; then
    set -- --shapes 64x64x112x112 64x256x56x56 64x2048x7x7 16384x2048 8x64x16x56x56 5x3 --dtypes float32 bfloat16
  fi
  bench_limit=$(left 3)
  step bench "$bench_limit" 3 "$PY" -m bn_gpu bench --out "$out/bench" --budget-s $(( bench_limit - 30 )) "$@"
fi

# ---- summary: what to paste into profiling/RESULTS.md ----------------------------------------
count() { local n; n=$(grep -c "$1" "$2" 2>/dev/null); echo "${n:-0}"; }
{
  echo
  echo "## gpu_check.sh, $(date -u +%Y-%m-%dT%H:%MZ), ${device}, budget ${budget} s, took $(( $(now) - start )) s"
  grep -h -E "^torch|^cupy" "$out/env.log" | sed 's/^/- /'
  [ -s "$out/preflight.log" ] && echo "- preflight: $(count '^ok' "$out/preflight.log") ok, $(count '^FAIL' "$out/preflight.log") failed"
  grep -h '^FAIL' "$out/preflight.log" 2>/dev/null | sed 's/^/  - /'
  echo "- GPU tests: $(grep -E '(passed|failed|error|skipped|no tests ran)' "$out/gpu-tests.log" 2>/dev/null | tail -1)"
  grep -q KeyboardInterrupt "$out/gpu-tests.log" 2>/dev/null && \
    echo "  - **interrupted at the step's limit: the counts are of the tests that finished, not of all**"
  grep -h -E '^(FAILED|ERROR) ' "$out/gpu-tests.log" 2>/dev/null | head -40 | cut -c1-300 | sed 's/^/  - /'
  echo
  bench_md=$(ls -t "$out"/bench/*.md 2>/dev/null | head -1)
  # The per-case summary and the gap to the targets; every row stays in the .md/.json beside it.
  if [ -n "$bench_md" ]; then sed '/^## Every row/,$d' "$bench_md"; else echo "(no benchmark results)"; fi
  echo
  echo '```'
  cat "$out/host-overhead.log" "$out/host-overhead-jit.log" 2>/dev/null
  echo '```'
  train_md=$(ls -t "$out"/train-step/*.md 2>/dev/null | head -1)
  if [ -n "$train_md" ]; then echo; sed 's/^# /### /' "$train_md"; fi
  if [ -s "$out/kernel-times.log" ]; then
    echo
    echo "Kernel time per op, L2 flushed (profiling/kernel_times.py; every kernel in kernel-times.log):"
    echo '```'
    grep -h ': kernels' "$out/kernel-times.log"
    echo '```'
  fi
} >> "$summary"
cat "$summary"
