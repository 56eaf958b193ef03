"""Every Triton kernel variant that bn_gpu launches -- derived from the real launch plans, with the
JIT's argument specialization -- compiled ahead of time for sm_80 and sm_90 by Triton's own
compiler, on a CPU machine: a kernel that the interpreter runs but the compiler rejects (types of
loop-carried values, unsupported ops, a specialization the plans produce) fails CI without a GPU.

The interpreter replaces triton.jit at import time, so the compile runs in a child process
with TRITON_INTERPRET=0."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("aot_compile.py")
KERNELS = {f"{job}_{family}" for job in ("statistics", "normalize", "single_pass_forward", "gradient_sums",
                                         "input_gradient", "single_pass_backward")
           for family in ("channels_first", "channels_last")} | {"finalize_moments", "merge_ranks"}
# finalize_statistics and finalize_gradients are not launched by the Triton plans: the statistics and
# gradient-sums kernels finalize themselves (FINALIZE).


@pytest.mark.parametrize("capability", [80, 90], ids=lambda c: f"sm_{c}")
def test_every_launched_kernel_variant_compiles_for_gpu(capability):
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, str(SCRIPT), str(capability)], env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"compiled (\d+) kernel variants of (\d+) kernels for sm_\d+ with triton \S+: (.*)", result.stdout)
    assert match, result.stdout
    assert set(match.group(3).split(", ")) == KERNELS
    assert int(match.group(1)) > 2 * len(KERNELS)  # dtypes, flags and tiles give several variants each
