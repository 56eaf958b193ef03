"""Every Triton kernel variant that bn_gpu launches -- derived from the real launch plans, with the
JIT's argument specialization -- compiled ahead of time for sm_90 (H100, H200) by Triton's own
compiler, on a CPU machine, and one variant of each code path (kernel, dtype, boolean constexprs)
for sm_80: a kernel that the interpreter runs but the compiler rejects (types of loop-carried
values, unsupported ops, a specialization the plans produce) fails CI without a GPU.

The interpreter replaces triton.jit at import time, so the compile runs in a child process
with TRITON_INTERPRET=0."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

# One xdist worker runs this module (`make test`: --dist loadgroup), so its compile fixture starts once.
pytestmark = [pytest.mark.xdist_group("triton-aot"), pytest.mark.slow]

SCRIPT = pathlib.Path(__file__).with_name("aot_compile.py")
KERNELS = {f"{job}_{family}" for job in ("statistics", "normalize", "single_pass_forward", "gradient_sums",
                                         "input_gradient", "single_pass_backward", "on_chip_forward",
                                         "on_chip_backward")
           for family in ("channels_first", "channels_last")} | {"finalize_moments", "merge_ranks",
                                                                 "finalize_ghost_statistics", "finalize_ghost_gradients"}
# finalize_statistics and finalize_gradients are not launched by the Triton plans: the statistics and
# gradient-sums kernels finalize themselves (FINALIZE).


# The targets, and whether each compiles every variant or one of each code path (aot_compile.py): the
# variants of a path differ in tile sizes, stages and hints, whose code the sm_90 compile covers.
CAPABILITIES = {80: ["--paths"], 90: []}


@pytest.fixture(scope="module")
def compile_runs():
    """One compiling process per target, started together (each is single-threaded: side by side
    they take half the wall time on a 2-core CI machine). {capability: process}."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    runs = {capability: subprocess.Popen([sys.executable, str(SCRIPT), str(capability), *how], env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for capability, how in CAPABILITIES.items()}
    yield runs
    for process in runs.values():
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("capability", list(CAPABILITIES), ids=lambda c: f"sm_{c}")
def test_the_launched_kernel_variants_compile_for_gpu(compile_runs, capability):
    process = compile_runs[capability]
    stdout, stderr = process.communicate(timeout=1200)
    assert process.returncode == 0, stdout + stderr
    match = re.search(r"compiled (\d+) kernel variants of (\d+) kernels for sm_\d+ with triton \S+: (.*)", stdout)
    assert match, stdout
    assert set(match.group(3).split(", ")) == KERNELS
    assert int(match.group(1)) > 2 * len(KERNELS)  # dtypes, flags and tiles give several variants each



# Rows that start on 16 bytes although their length is no multiple of 16 values (kernels/alignment.py):
# the compiled second passes must stream x, dy, y and dx 16 bytes at a time (their accesses carry an
# L2 cache hint; the per-channel parameters' do not), which the interpreter cannot show. 64x24x7x7:
# channel groups whose batch rows (24 x 49 values) are no multiple of 16 values either.
ALIGNED_ROWS = """
import re, torch
from bn_gpu.tools import launches
for shape, dtype, layout in [((32, 256, 14, 14), torch.float32, "contiguous"),
                             ((128, 24, 56, 56), torch.float32, "channels_last"),
                             ((128, 24, 56, 56), torch.bfloat16, "channels_last"),
                             ((64, 24, 7, 7), torch.float32, "contiguous")]:
    for op in ("eval_fwd", "train_bwd"):
        for launch in launches.record("triton", op, shape, dtype, layout):
            if launch.name.startswith(("normalize", "input_gradient")):
                ptx = launches.compile_triton(launch, 90).asm["ptx"]
                streaming = re.findall(r"(?:ld|st)\\.global\\S*L2::cache_hint(\\.v[248])?\\.b", ptx)
                print(launch.name, launch.meta["ALIGN"], sorted(set(streaming)))
"""


def test_rows_aligned_by_the_plan_stream_16_bytes_at_a_time():
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", ALIGNED_ROWS], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    # eval normalize and backward dx of three inputs; 64x24x7x7's eval normalize (its backward runs on chip)
    assert len(lines) == 7, result.stdout
    for line in lines:
        name, align, widths = line.split(" ", 2)
        assert int(align) > 1 and widths == "['.v4']", line
