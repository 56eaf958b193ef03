"""`python -m bn_gpu demo` runs the seed's example through the real kernels and shows the seed's numbers."""
import os
import subprocess
import sys


def test_demo_walks_the_seed_example():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the demo picks the GPU, or the interpreter on its own
    result = subprocess.run([sys.executable, "-m", "bn_gpu", "demo"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Triton" in out and "backend='triton'" in out
    assert "[  3.00000,   4.00000,   5.00000]" in out          # batch 1 mean
    assert "[  8.00000,   9.00000,  10.00000]" in out          # batch 2 mean
    assert "[ -1.41421,  -1.41421,  -1.41421]" in out          # first normalized row
    assert "[  0.30000,   0.40000,   0.50000]" in out          # running_mean after batch 1
    assert "[  1.15000,   1.15000,   1.15000]" in out          # running_var after batch 1
    assert "[  3.83670,   4.18060,   4.52450]" in out          # running_mean after batch 4
    assert "[  1.51585,   1.51585,   1.51585]" in out          # running_var after batch 4
    assert "Eval mode" in out
