"""The static model (python -m bn_gpu model): its SASS and resource parsing on known snippets, its
traffic model on known plans, and one end-to-end run where the tools are present."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bn_gpu.tools import launches, model

SASS = """
        Function : toy_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   MOV R2, RZ ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/              @!P0 LDG.E.U16 R8, desc[UR4][R6.64] ;
        /*0040*/                   FADD R2, R4, R2 ;
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0060*/                   NOP ;
        /*0070*/               @P1 BRA 0x20 ;
        /*0080*/                   STG.E.64 desc[UR4][R2.64], R4 ;
        /*0090*/                   EXIT ;
        /*00a0*/                   BRA 0xa0 ;
"""

RESOURCES = """
Resource usage:
 Common:
  GLOBAL:0
 Function toy_kernel:
  REG:40 STACK:8 SHARED:1024 LOCAL:16 CONSTANT[0]:592 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_sass_loop_analysis():
    functions = model.parse_sass(SASS)
    assert list(functions) == ["toy_kernel"] and len(functions["toy_kernel"]) == 11
    (loop,) = model.main_loops(functions["toy_kernel"])  # the self-loop at 0xa0 loads nothing
    assert loop.instructions == 5  # 0x20..0x70 without the NOP
    assert sorted(loop.load_bits) == [16, 128] and loop.store_bits == [] and loop.barriers == 1


FUSED_FINALIZE_SASS = """
        Function : reduce_then_finalize
        /*0000*/                   LDG.E.U16.CONSTANT R4, desc[UR4][R2.64] ;
        /*0010*/                   FADD R2, R4, R2 ;
        /*0020*/               @P1 BRA 0x0 ;
        /*0030*/                   ATOMG.E.ADD.STRONG.GPU PT, R5, desc[UR4][R6.64], R7 ;
        /*0040*/                   LDG.E.STRONG.GPU R8, desc[UR4][R6.64] ;
        /*0050*/                   LDG.E.STRONG.GPU R9, desc[UR4][R6.64+0x4] ;
        /*0060*/                   LDG.E.STRONG.GPU R10, desc[UR4][R6.64+0x8] ;
        /*0070*/               @P2 BRA 0x40 ;
        /*0080*/                   EXIT ;
"""


def test_the_streaming_loop_is_found_behind_a_fused_finalize():
    """The finalize's loop over partials (coherent .STRONG loads, 96 bits) loads more per iteration
    than a 16-bit streaming loop; the streaming loop is still the one the figures describe."""
    loops = model.main_loops(model.parse_sass(FUSED_FINALIZE_SASS)["reduce_then_finalize"])
    assert [loop.load_bits for loop in loops] == [[16], [32, 32, 32]]
    assert loops[0].instructions == 3


DIVERGENCE_SASS = """
        Function : reduce_then_normalize
        /*0000*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0010*/                   FADD R2, R4, R2 ;
        /*0020*/               @P1 BRA 0x0 ;
        /*0030*/                   BRA.DIV UR4, 0x0100 ;
        /*0040*/                   SHFL.DOWN PT, R5, R2, 0x1, 0x1f ;
        /*0050*/                   LDG.E R6, desc[UR4][R8.64] ;
        /*0060*/                   LDG.E R7, desc[UR4][R8.64+0x4] ;
        /*0070*/                   LDG.E.64 R10, desc[UR4][R8.64+0x8] ;
        /*0080*/                   EXIT ;
        /*0100*/                   WARPSYNC.COLLECTIVE R2, 0x120 ;
        /*0110*/                   SHFL.DOWN P2, R5, R2, R3, R4 ;
        /*0120*/                   BRA 0x50 ;
"""


def test_a_divergence_fallback_jumping_back_is_no_loop():
    """nvcc puts the path a BRA.DIV takes for an unconverged warp after the body, ending in a jump
    back: not a loop, and its span (here the per-channel parameter loads) is not the main loop."""
    loops = model.main_loops(model.parse_sass(DIVERGENCE_SASS)["reduce_then_normalize"])
    assert [loop.load_bits for loop in loops] == [[128]]


def test_resource_parsing_and_occupancy():
    usage = model.parse_resources(RESOURCES)["toy_kernel"]
    assert usage == dict(registers=40, stack=8, shared=1024, local=16)
    compiled = model.Compiled("triton", "toy", registers=40, spill_bytes=24, shared_bytes=1024, loops=[])
    h200 = model.TARGETS["h200"]
    # 40 registers x 32 lanes = 1280 per warp; 4 warps per block: 65536 / 5120 = 12 blocks
    assert model.occupancy(compiled, 128, h200) == 12
    heavy = model.Compiled("triton", "heavy", registers=255, spill_bytes=0, shared_bytes=0, loops=[])
    assert model.occupancy(heavy, 256, h200) == 1  # 255 -> 256 registers: 8 warps x 8192


def test_a_partial_last_wave_runs_as_long_as_a_full_one():
    assert model.tail_factor(0.73) == 1.0  # every program resident at once
    assert model.tail_factor(1.0) == 1.0
    assert model.tail_factor(576 / 528) == pytest.approx(2 * 528 / 576)  # 1.09 waves run as 2
    assert model.tail_factor(1.98) == pytest.approx(2 / 1.98)


def test_traffic_of_a_known_split_plan(monkeypatch):
    """64x64x112x112 fp32 contiguous, split path: statistics reads x; normalize reads x again and
    writes y. Walked in reverse (both backends), the second read's first 40 MB (the reusable L2
    assumed) are hits; walked in the statistics' order, the second read of 205 MB would miss the L2
    entirely: 3|x| for a 2|x| floor."""
    import bn_gpu.backends.cupy as cupy_backend
    h200 = model.TARGETS["h200"]
    shape = (64, 64, 112, 112)
    size = math.prod(shape) * 4
    case = (shape, torch.float32, "contiguous", "train_fwd")
    for backend in ("cupy", "triton"):
        recorded = launches.record(backend, "train_fwd", shape, torch.float32, "contiguous", sms=h200.sms)
        # The statistics finalized by the kernel's last programs.
        assert [l.name for l in recorded] == ["statistics_channels_first", "normalize_channels_first"]
        assert model.dram_bytes(recorded[0], case, h200, per_sm=8) == size
        second_read = size - h200.l2_reuse_mb * 1e6
        assert model.dram_bytes(recorded[-1], case, h200, per_sm=8) == pytest.approx(second_read + size)
    monkeypatch.setattr(cupy_backend, "SECOND_PASS_REVERSED", False)
    recorded = launches.record("cupy", "train_fwd", shape, torch.float32, "contiguous", sms=h200.sms)
    assert model.dram_bytes(recorded[-1], case, h200, per_sm=8) == pytest.approx(2 * size)
    # The same input at 5 MB fits the L2: the second read is a hit (on the two-pass plan, where the
    # on-chip kernels are off).
    import bn_gpu.backends.plan
    monkeypatch.setattr(bn_gpu.backends.plan, "GPU_TUNING",
                        dataclasses.replace(bn_gpu.backends.plan.GPU_TUNING, on_chip_bytes=0))
    small = (8, 64, 56, 56)
    recorded = launches.record("triton", "train_fwd", small, torch.float32, "contiguous", sms=h200.sms)
    case = (small, torch.float32, "contiguous", "train_fwd")
    normalize = next(l for l in recorded if l.name.startswith("normalize"))
    assert model.dram_bytes(normalize, case, h200, per_sm=8) == math.prod(small) * 4  # y only


def test_traffic_of_a_single_pass_whose_resident_slices_exceed_the_l2(monkeypatch):
    """64x2048x7x7 fp32 backward without the on-chip kernels, one single-pass launch of 512 programs:
    at 4 programs an SM all are resident, and their slices of dy and x (51 MB) exceed the 40 MB of
    reusable L2. Each program re-reads its slice from the end it read last, so only the oldest 11 MB
    miss; re-read in order, all of it would. At 2 programs an SM the resident slices (26 MB) fit: no
    second read. With them, the backward's walk reads dy and x once: 3|x|."""
    import bn_gpu.backends.cupy as cupy_backend
    import bn_gpu.backends.plan as plans
    h200 = model.TARGETS["h200"]
    shape = (64, 2048, 7, 7)
    size = math.prod(shape) * 4
    case = (shape, torch.float32, "contiguous", "train_bwd")
    walked, = launches.record("cupy", "train_bwd", shape, torch.float32, "contiguous", sms=h200.sms)
    assert walked.name == "on_chip_backward_channels_first" and walked.programs == h200.sms
    assert model.dram_bytes(walked, case, h200, per_sm=1) == 3 * size
    monkeypatch.setattr(plans, "GPU_TUNING", dataclasses.replace(plans.GPU_TUNING, on_chip_bytes=0))
    recorded = launches.record("cupy", "train_bwd", shape, torch.float32, "contiguous", sms=h200.sms)
    assert [l.name for l in recorded] == ["single_pass_backward_channels_first"]
    assert recorded[0].programs <= 4 * h200.sms
    reuse = h200.l2_reuse_mb * 1e6
    missed = 2 * size * (1 - reuse / (2 * size))
    assert model.dram_bytes(recorded[0], case, h200, per_sm=4) == pytest.approx(3 * size + missed)
    assert model.dram_bytes(recorded[0], case, h200, per_sm=2) == pytest.approx(3 * size)
    monkeypatch.setattr(cupy_backend, "SECOND_PASS_REVERSED", False)
    assert model.dram_bytes(recorded[0], case, h200, per_sm=4) == pytest.approx(5 * size)


def test_launch_counts_of_both_backends():
    for backend in ("triton", "cupy"):  # the reductions finalize themselves
        for op, split, single in (("train_fwd", 2, 1), ("eval_fwd", 1, 1), ("train_bwd", 2, 1), ("eval_bwd", 1, 1)):
            assert len(launches.record(backend, op, (64, 64, 112, 112), torch.bfloat16, "channels_last")) == split
            assert len(launches.record(backend, op, (5, 3), torch.float32)) == single


@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_ghost_batch_norm_is_modelled_on_the_kernels_of_both_backends(backend):
    """Ghost BatchNorm's ops: N a multiple of the virtual batches. Its three launches move what the
    plain split path's two do, plus the per-virtual-batch partials: the normalize re-reads x as the
    plain one does (in reverse, the reusable L2's worth a hit)."""
    from bn_gpu.tools.model import targets
    assert targets.modelled(backend, (64, 64, 112, 112), "ghost_train_fwd")
    assert not targets.modelled(backend, (5, 3), "ghost_train_bwd")
    assert targets.modelled("cupy", (5, 3), "train_bwd")
    assert targets.plain_op("ghost_train_bwd") == "train_bwd" and targets.plain_op("train_bwd_relu") == "train_bwd"
    h200 = model.TARGETS["h200"]
    shape = (64, 64, 112, 112)
    size = math.prod(shape) * 4
    recorded = launches.record(backend, "ghost_train_fwd", shape, torch.float32, "contiguous", sms=h200.sms,
                               virtual_batches=targets.VIRTUAL_BATCHES)
    assert [l.name for l in recorded] == ["statistics_channels_first", "finalize_ghost_statistics",
                                          "normalize_channels_first"]
    case = (shape, torch.float32, "contiguous", "ghost_train_fwd")
    statistics, finalize, normalize = (model.dram_bytes(l, case, h200, per_sm=4) for l in recorded)
    assert statistics == size
    assert normalize == pytest.approx(size - h200.l2_reuse_mb * 1e6 + size)
    assert 0 < finalize < size / 1000  # partials, mean, invstd, running statistics: per virtual channel
    recorded = launches.record(backend, "ghost_train_bwd", shape, torch.float32, "contiguous", sms=h200.sms,
                               virtual_batches=targets.VIRTUAL_BATCHES)
    case = (shape, torch.float32, "contiguous", "ghost_train_bwd")
    sums, _, dx = (model.dram_bytes(l, case, h200, per_sm=4) for l in recorded)
    assert sums == 2 * size  # dy and x
    assert dx == pytest.approx(2 * (size - h200.l2_reuse_mb * 1e6 / 2) + size)  # dy and x again, dx written


@pytest.mark.slow
@pytest.mark.skipif(bool(model.missing_tools(["triton", "cupy"])),
                    reason=f"the model needs {', '.join(model.missing_tools(['triton', 'cupy']))}")
def test_model_runs_end_to_end(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-m", "bn_gpu", "model", "--shapes", "64x256x56x56", "64x2048x7x7", "5x3",
                             "--dtypes", "bfloat16", "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert "# Static model: NVIDIA H200" in text and "assumed" in text.lower()
    for backend in ("triton", "cupy"):
        for op in ("train_fwd", "eval_fwd", "train_bwd"):
            assert f"| {backend} | 64x256x56x56 | bfloat16 | channels_last | {op} |" in text
    assert "<__nv_bfloat16, float" in text  # the CUDA C kernels were compiled too
    assert "| triton | 64x256x56x56 | bfloat16 | channels_last | ghost_train_bwd | 3 / 2 |" in text
    assert "| cupy | 64x256x56x56 | bfloat16 | channels_last | ghost_train_fwd | 3 / 2 |" in text
    assert list(tmp_path.glob("model-h200-*.json")) and list(tmp_path.glob("model-h200-*.md"))
    # 64x256x56x56 and 64x2048x7x7 in two layouts, 5x3 in one; 2 backends; Ghost BatchNorm not on 5x3
    ghost = [op for op in model.OPS if op.startswith("ghost_")]
    cases = 5 * 2 * (len(model.OPS) - len(ghost)) + 4 * 2 * len(ghost)
    assert f"[1/{cases}] " in result.stderr and f"[{cases}/{cases}] " in result.stderr  # progress per case
    assert "written: " + str(tmp_path) in result.stderr
    # 7x7 channels-first planes: rows of 49 values cannot start on 16 bytes, so a Triton program owns
    # 8 adjacent bf16 channels (392 values a row) and every streaming loop loads 16 bytes at a time.
    (report,) = tmp_path.glob("model-h200-*.json")
    # (Ghost BatchNorm's programs of one tile, loop-less, count their channels' 16-bit shifts beside.)
    planes = [case for case in json.loads(report.read_text())["cases"]
              if case["backend"] == "triton" and case["shape"] == "64x2048x7x7" and case["layout"] == "contiguous"
              and not case["op"].startswith("ghost_")]
    assert planes and all(kernel["load_widths"] == "128" for case in planes for kernel in case["kernels"]), planes
    assert "GROUP=8" in text
    # The CUDA C split reductions of both layouts copy ahead into shared memory (kernels/cuda/async_copies.cuh):
    # the ~96 KB at once per SM that the H200's latency asks (kernels v3, part 1).
    cases = json.loads(report.read_text())["cases"]
    reductions = [kernel for case in cases if case["backend"] == "cupy" and case["shape"] == "64x256x56x56"
                  and case["op"] in ("train_fwd", "train_bwd") for kernel in case["kernels"]
                  if kernel["name"].startswith(("statistics_", "gradient_sums_"))]
    assert len(reductions) == 4, reductions
    assert all(kernel["bytes_at_once_per_sm"] >= 96 * 1024 for kernel in reductions), reductions


INTERLEAVED_SASS = """
        Function : interleaved
        /*0000*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0010*/                   FADD R20, R4, R20 ;
        /*0020*/                   LDG.E.128.CONSTANT R8, desc[UR4][R2.64+0x10] ;
        /*0030*/                   FADD R20, R8, R20 ;
        /*0040*/               @P0 BRA 0x0 ;
        /*0050*/                   EXIT ;
        Function : batched
        /*0000*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0010*/                   LDG.E.128.CONSTANT R8, desc[UR4][R2.64+0x10] ;
        /*0020*/                   IADD3 R2, P1, R2, 0x20, RZ ;
        /*0030*/                   FADD R20, R4, R20 ;
        /*0040*/                   FADD R20, R11, R20 ;
        /*0050*/                   STG.E.128 desc[UR4][R12.64], R8 ;
        /*0060*/               @P0 BRA 0x0 ;
        /*0070*/                   EXIT ;
"""


def test_loads_in_flight_at_once_end_at_the_first_use_of_a_pending_load():
    """Each load used before the next is issued keeps one in flight; loads issued before the first
    use of either are in flight together (a .128 load's four destination registers all count)."""
    functions = model.parse_sass(INTERLEAVED_SASS)
    (interleaved,) = model.main_loops(functions["interleaved"])
    (batched,) = model.main_loops(functions["batched"])
    assert sum(interleaved.load_bits) == sum(batched.load_bits) == 256
    assert interleaved.loads_at_once_bits == 128
    assert batched.loads_at_once_bits == 256


def test_a_walk_of_fewer_groups_than_a_batch_loads_them_one_by_one():
    """walk_trips mirrors kernels/cuda/channels_first.cuh's tile_walk and walk: a thread's groups per wait."""
    def trips(rows, block_s, S, vec=4, threads=256, unroll=4, N=64):
        return model.walk_trips(rows=rows, block_s=block_s, N=N, S=S, vec=vec, threads=threads, unroll=unroll)
    assert trips(rows=2, block_s=2048, S=4096) == 1.0   # along rows of 2 groups a thread: one by one
    assert trips(rows=4, block_s=1024, S=4096) == 4.0   # one turn a row: down 4 rows, loaded at once
    assert trips(rows=16, block_s=256, S=4096) == 4.0   # 4 rows a turn, every 4th row
    assert trips(rows=1, block_s=8192, S=5120) == 2.5   # 5 groups: a batch of 4, then 1
    assert trips(rows=4, block_s=1024, S=4096, N=2) == 1.0  # N = 2: two rows, fewer than a batch
    assert trips(rows=4, block_s=1024, S=4096, unroll=2) == 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_channels_first_plans_give_every_walk_a_whole_batch(dtype):
    """The CUDA C channels-first plans of the benchmark shapes give each thread, in each walk of a
    full tile, the groups its loop loads at once (4; dx 2 a batch): tiles of at most one turn a row."""
    walked = 0
    for shape in ("64x64x112x112", "64x256x56x56", "8x64x16x56x56", "64x2048x7x7"):
        for op in ("train_fwd", "train_bwd"):
            sizes = tuple(int(size) for size in shape.split("x"))
            for launch in launches.record("cupy", op, sizes, dtype, "contiguous"):
                if "tile_walk" not in launch.meta:
                    continue
                job = model.job_of(launch.name)
                unroll = model.WALK_UNROLL.get(job, 4)
                figure = model.walk_trips(threads=math.prod(launch.block), unroll=unroll, **launch.meta["tile_walk"])
                assert figure == unroll, (shape, op, launch.name, launch.meta)
                walked += 1
    assert walked == 12  # 3 shapes x (statistics, normalize, gradient sums, dx); 7x7 planes are grouped


PIPELINED_SASS = """
        Function : pipelined
        /*0000*/                   LDGSTS.E.BYPASS.128 [R6], desc[UR12][R10.64], P2 ;
        /*0010*/                   LDGSTS.E.BYPASS.128 [R6+0x1000], desc[UR12][R2.64], P3 ;
        /*0020*/                   LDGDEPBAR ;
        /*0030*/                   LDGSTS.E.BYPASS.128 [R6+0x2000], desc[UR12][R12.64], P2 ;
        /*0040*/                   LDGSTS.E.BYPASS.128 [R6+0x3000], desc[UR12][R10.64], P1 ;
        /*0050*/                   LDGDEPBAR ;
        /*0060*/                   DEPBAR.LE SB0, 0x1 ;
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0080*/                   LDS.128 R20, [R51] ;
        /*0090*/                   LDS.128 R24, [R51+0x1000] ;
        /*00a0*/                   FADD R40, R20, R40 ;
        /*00b0*/                   FADD R41, R24, R41 ;
        /*00c0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00d0*/                   LDGSTS.E.BYPASS.128 [R51], desc[UR12][R22.64], P6 ;
        /*00e0*/                   LDGSTS.E.BYPASS.128 [R51+0x1000], desc[UR12][R22.64], P6 ;
        /*00f0*/                   LDGDEPBAR ;
        /*0100*/               @P5 BRA 0x60 ;
        /*0110*/                   DEPBAR.LE SB0, 0x0 ;
        /*0120*/               @P4 BRA 0x0 ;
        /*0130*/                   EXIT ;
"""


def test_a_software_pipelined_loop_keeps_its_copies_in_flight_by_group():
    """Asynchronous copies (LDGSTS) are waited on by group: DEPBAR.LE SB0, 1 leaves one group in
    flight, so the loop that issues a group of 2 x 16 bytes an iteration has 2 groups, 64 bytes, at
    once. It is the main loop, not the loop around it that holds the pipeline's prologue (more
    copies, no group left in flight); LDGDEPBAR is no load."""
    (function,) = model.parse_sass(PIPELINED_SASS).values()
    loops = model.main_loops(function)
    assert [loop.pipelined for loop in loops] == [True, False]
    assert loops[0].load_bits == [128, 128] and loops[0].loads_at_once_bits == 2 * 256
    assert loops[0].barriers == 2
    assert loops[1].load_bits == [128] * 4 and loops[1].loads_at_once_bits == 4 * 128


DOUBLE_BUFFERED_SASS = """
        Function : double_buffered
        /*0000*/                   LDGSTS.E.BYPASS.128 [R6], desc[UR12][R10.64] ;
        /*0010*/                   LDGSTS.E.BYPASS.128 [R6+0x1000], desc[UR12][R2.64] ;
        /*0020*/                   LDGDEPBAR ;
        /*0030*/                   DEPBAR.LE SB0, 0x1 ;
        /*0040*/                   LDS.128 R20, [R51] ;
        /*0050*/                   FADD R40, R20, R40 ;
        /*0060*/                   LDGSTS.E.BYPASS.128 [R7], desc[UR12][R12.64] ;
        /*0070*/                   LDGSTS.E.BYPASS.128 [R7+0x1000], desc[UR12][R14.64] ;
        /*0080*/                   LDGDEPBAR ;
        /*0090*/                   DEPBAR.LE SB0, 0x1 ;
        /*00a0*/                   LDS.128 R24, [R52] ;
        /*00b0*/                   FADD R41, R24, R41 ;
        /*00c0*/               @P5 BRA 0x0 ;
        /*00d0*/                   EXIT ;
"""


def test_a_loop_closing_several_groups_an_iteration_counts_the_groups_it_waits_on():
    """The CUDA C gradient sums copy half tiles: two groups (LDGDEPBAR) an iteration of 2 x 16 bytes
    each, each waited on with one left in flight (DEPBAR.LE SB0, 1): 2 groups, 64 bytes, at once --
    not the iteration's 4 copies twice over."""
    (function,) = model.parse_sass(DOUBLE_BUFFERED_SASS).values()
    (loop,) = model.main_loops(function)
    assert loop.pipelined and loop.load_bits == [128] * 4
    assert loop.loads_at_once_bits == 2 * 2 * 128


DEEP_PIPELINE_SASS = """
        Function : deep
        /*0000*/                   DEPBAR.LE SB0, 0x3 ;
        /*0010*/                   LDS.128 R20, [R51] ;
        /*0020*/                   FADD R40, R20, R40 ;
        /*0030*/                   LDGSTS.E.BYPASS.128 [R6], desc[UR12][R10.64] ;
        /*0040*/                   LDGSTS.E.BYPASS.128 [R6+0x1000], desc[UR12][R2.64] ;
        /*0050*/                   LDGDEPBAR ;
        /*0060*/               @P5 BRA 0x0 ;
        /*0070*/                   EXIT ;
"""


def test_a_deep_pipeline_keeps_the_groups_its_wait_leaves():
    """Five stages (Triton's channels-last statistics): one group of 2 x 16 bytes an iteration, waited
    on with 3 left: 4 groups, 128 bytes, in flight at the wait."""
    (function,) = model.parse_sass(DEEP_PIPELINE_SASS).values()
    (loop,) = model.main_loops(function)
    assert loop.pipelined and loop.loads_at_once_bits == 4 * 256
