"""python -m bn_gpu model: what the compiled code and the launch plans imply on a target GPU,
computed on a machine without one.

For each benchmark case (shape x dtype x layout x op) and GPU backend:
  1. the launches the backend makes (bn_gpu.tools.launches records them on meta tensors): kernel, grid,
     block, programs per SM, waves;
  2. every launched kernel variant compiled for the target as it runs (Triton: the JIT's
     constexprs and argument specialization; CUDA C: nvcc with the backend's options), read back
     with cuobjdump: registers, spills, shared memory, occupancy, and in the main loop (the loop
     with the global loads) the load/store widths, barriers and SASS instructions per element;
  3. a DRAM-traffic model (bytes each launch reads and writes; a second read of x counts as an
     L2 hit only where what it re-reads can still be resident), the upper bound it gives in % of
     the floor, an issue-rate bound from instructions per element, the bytes in flight per SM
     against what the bandwidth needs (Little's law), and the host cost of the launches.

Every figure is either read from the compiled code, computed from the plan, or an assumption of
the target (marked "assumed" in the output). It is a model: no GPU ran anything.

    targets.py    the targets and their assumed figures; the ops, shapes and dtypes modelled
    toolchain.py  the CUDA tools it runs
    sass.py       SASS analysis: main loops, loads in flight, instructions per element
    compiled.py   every launched kernel variant compiled for the target, resources read back
    case.py       the model of one case: DRAM bytes, bounds, tails, bytes in flight
    report.py     the command (run, add_arguments), its tables and files
"""
from .case import WALK_UNROLL, CaseFigures, dram_bytes, model_case, occupancy, tail_factor, walk_trips
from .compiled import Compiled, Compiler
from .report import add_arguments, missing_tools, run, unused_stem
from .sass import LoopStats, loads_at_once, loop_ranges, main_loops, parse_resources, parse_sass
from .targets import OPS, TARGETS, Target, job_of
from .toolchain import tool

__all__ = ["OPS", "TARGETS", "WALK_UNROLL", "CaseFigures", "Compiled", "Compiler", "LoopStats", "Target",
           "add_arguments", "dram_bytes", "job_of", "loads_at_once", "loop_ranges", "main_loops", "missing_tools",
           "model_case", "occupancy", "parse_resources", "parse_sass", "run", "tail_factor", "tool", "unused_stem",
           "walk_trips"]
