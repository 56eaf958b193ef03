"""Launch plans fill the GPU, and the launch budget holds: at most 2 launches for a training
forward (statistics finalized by its last programs, normalize), 2 for a backward and 1 for eval,
1 for each on the single-pass path, counting torch glue operations as launches."""
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bn_gpu.backends import plan
from bn_gpu.backends.triton import launcher, sites
from bn_gpu.tools import launches as recorded_launches
import bn_gpu.backends.triton as triton_backend
from support import Allocations, make_input, make_params

SMS = 132  # an H100 / H200
# Allocations and views launch nothing.
FREE = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default, torch.ops.aten.empty_like.default,
        torch.ops.aten.new_empty.default, torch.ops.aten.as_strided.default, torch.ops.aten.view.default,
        torch.ops.aten.select.int, torch.ops.aten.unbind.int, torch.ops.aten.movedim.int,
        torch.ops.aten.permute.default, torch.ops.aten.detach.default, torch.ops.aten.alias.default}


@pytest.mark.parametrize("shape", [(64, 3, 112, 112), (64, 64, 112, 112), (64, 2048, 7, 7), (16384, 2048),
                                   (8, 64, 16, 56, 56)], ids=str)
def test_plans_fill_the_gpu(shape):
    N, C, S = shape[0], shape[1], 1
    for size in shape[2:]:
        S *= size
    first = plan.channels_first_plan(N, C, S, 4, plan.GPU_TUNING, SMS)
    last = plan.channels_last_plan(N * S, C, 4, plan.GPU_TUNING, SMS)
    for p in (first, last):
        programs = p.grid(C)[0] * p.grid(C)[1]
        assert programs >= SMS, (p, programs)
    # Every tile of a channel belongs to exactly one program.
    assert (first.splits - 1) * first.tiles_per_program < first.total_tiles <= first.splits * first.tiles_per_program
    assert (last.splits - 1) * last.rows_per_program < N * S <= last.splits * last.rows_per_program


@pytest.mark.parametrize("C, splits", [(64, 8), (256, 2), (100, 5), (300, 2), (527, 2), (528, 1), (2048, 1)])
def test_split_grids_end_on_a_whole_wave(C, splits):
    """4 programs per SM on 132 SMs hold 528: the splits per channel round down to fit them (64
    channels: 8 splits, 512 programs, not 9 and a partial wave of 48), but never to 1, which is the
    single pass: that needs C >= 528 (channels-last: channel blocks)."""
    first = plan.channels_first_plan(64, C, 12544, 4, plan.GPU_TUNING, SMS)
    assert first.splits == splits
    assert splits <= 2 or C * splits <= 528
    last = plan.channels_last_plan(64 * 12544, C * plan.GPU_TUNING.max_block_c, 4, plan.GPU_TUNING, SMS)
    assert last.splits == splits and last.c_blocks == C


@pytest.mark.parametrize("shape, dtype, memory_format, capped_jobs", [
    ((64, 64, 112, 112), torch.float32, torch.contiguous_format, ("statistics",)),
    ((64, 64, 112, 112), torch.float32, torch.channels_last, ("statistics", "gradient_sums", "input_gradient")),
    ((16384, 2048), torch.float32, torch.contiguous_format, ("gradient_sums",)),  # 128 channels a program
    # the static model's: 16-bit channels-first gradient sums with PAIRS over tiles of one row
    ((64, 64, 112, 112), torch.bfloat16, torch.contiguous_format, ("statistics", "gradient_sums")),
    ((64, 256, 56, 56), torch.float16, torch.contiguous_format, ("statistics", "gradient_sums")),  # 2 rows, folded
    ((32, 256, 14, 14), torch.bfloat16, torch.contiguous_format, ("statistics",)),  # channel groups
    # pipelined, capped by the static model:
    ((64, 64, 112, 112), torch.bfloat16, torch.channels_last, ("statistics", "gradient_sums")),
    ((16384, 2048), torch.float16, torch.contiguous_format, ("statistics", "gradient_sums")),
    ((64, 2048, 7, 7), torch.float32, torch.contiguous_format, ()),  # the single pass: no split
], ids=str)
def test_the_register_cap_reaches_the_split_reductions_where_it_measured_faster(shape, dtype, memory_format,
                                                                                capped_jobs):
    """GPU_TUNING.split_max_registers caps the Triton reductions of a split plan where run 7 measured
    them faster, and the pipelined 16-bit channels-last statistics and gradient sums, whose copies
    ahead the static model fits 4 programs an SM only under it (sites.split_register_cap), and the
    16-bit channels-first gradient sums with PAIRS over tiles of one row (the model's too); of the
    passes after them, the fp32 channels-last dx of 64 channels a program alone (the model's too);
    0 turns it off, and the 16-bit channels-last reductions' plain loops (load_stages 0) too."""
    x = torch.empty(shape, device="meta", dtype=dtype).contiguous(memory_format=memory_format)
    g = plan.geometry(x, x, plan.GPU_TUNING, SMS)
    jobs = ("statistics", "gradient_sums", "normalize", "input_gradient")
    capped = {job for job in jobs if sites.config(g, job)[2].get("maxnreg") == 64}
    assert capped == set(capped_jobs)
    off = plan.geometry(x, x, dataclasses.replace(plan.GPU_TUNING, split_max_registers=0), SMS)
    assert all("maxnreg" not in sites.config(off, job)[2] for job in ("statistics", "gradient_sums", "input_gradient"))
    plain = plan.geometry(x, x, dataclasses.replace(plan.GPU_TUNING, load_stages=0), SMS)
    sixteen_bit_channels_last = not g.channels_first and dtype.itemsize == 2
    for job in ("statistics", "gradient_sums"):
        assert (sites.config(plain, job)[2].get("maxnreg") == 64) == (job in capped_jobs
                                                                       and not sixteen_bit_channels_last), job


@pytest.mark.parametrize("shape, dtype, memory_format", [
    ((64, 64, 112, 112), torch.float32, torch.contiguous_format),
    ((64, 64, 112, 112), torch.bfloat16, torch.channels_last),
    ((64, 64, 112, 112), torch.float32, torch.channels_last),
    ((16384, 2048), torch.float32, torch.contiguous_format),
    ((8, 64, 16, 56, 56), torch.bfloat16, torch.contiguous_format),
], ids=str)
def test_the_split_reductions_are_software_pipelined(shape, dtype, memory_format):
    """GPU_TUNING.load_stages pipelines the tile loops of the split statistics and gradient sums
    (sites.load_stages): the channels-first gradient sums one stage fewer (two streams a tile), the
    channels-last reductions over tiles of half the plan's rows (a quarter in 16-bit statistics,
    with four stages more, fp32 two; the 16-bit gradient sums with one more); never the passes after them. 0
    turns it off, and the tiles are the plan's again."""
    x = torch.empty(shape, device="meta", dtype=dtype).contiguous(memory_format=memory_format)
    stages = plan.GPU_TUNING.load_stages
    assert stages > 1
    g = plan.geometry(x, x, plan.GPU_TUNING, SMS)
    off = plan.geometry(x, x, dataclasses.replace(plan.GPU_TUNING, load_stages=0), SMS)
    for job in ("statistics", "gradient_sums"):
        meta, plain = sites.config(g, job)[2], sites.config(off, job)[2]
        if g.channels_first:
            expected = stages - 1 if job == "gradient_sums" else stages
        else:
            expected = stages + 2 + 2 * (dtype.itemsize == 2) if job == "statistics" else stages + (dtype.itemsize == 2)
            rows = g.plan.block_m // (4 if job == "statistics" and dtype.itemsize == 2 else 2)
            assert meta["BLOCK_M"] == rows and plain["BLOCK_M"] == g.plan.block_m, job
        assert meta["STAGES"] == expected and plain["STAGES"] == 0, job
    for job in ("normalize", "input_gradient"):
        assert "STAGES" not in sites.config(g, job)[2], job


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=str)
def test_channels_first_single_passes_are_software_pipelined(memory_format):
    """A channels-first single pass copies its reductions' tiles ahead (load_stages stages); the
    channels-last one keeps its plain loop; load_stages=0 turns both plain."""
    x = torch.empty((64, 2048, 7, 7), device="meta", dtype=torch.float32).contiguous(memory_format=memory_format)
    g = plan.geometry(x, x, plan.GPU_TUNING, SMS)
    off = plan.geometry(x, x, dataclasses.replace(plan.GPU_TUNING, load_stages=0), SMS)
    assert g.plan.splits == 1 or not g.channels_first  # (channels-last: a split plan; its single-pass sites alike)
    for job in ("single_pass_forward", "single_pass_backward"):
        expected = plan.GPU_TUNING.load_stages if g.channels_first else 0
        assert sites.config(g, job)[2]["STAGES"] == expected, job
        assert sites.config(off, job)[2]["STAGES"] == 0, job


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_the_channels_last_gradient_sums_through_a_relu_keep_the_cap_where_pipelined(dtype):
    """The fused backward's channels-last gradient sums (the ReLU's mask) keep the cap where their loop
    is pipelined: 16-bit over tiles of half the rows with twice the tiles copied ahead, the same
    shared memory (static model: 91-95 registers at the pipelined tiles, 2 programs an SM; 64 and no
    spill at half, 4), fp32 over the pipelined tiles (58-61 registers either way). The plain loop
    (load_stages=0) through the mask drops the cap (it spilled under it)."""
    x = torch.empty((64, 64, 112, 112), device="meta", dtype=dtype).contiguous(memory_format=torch.channels_last)
    for tuning in (plan.GPU_TUNING, dataclasses.replace(plan.GPU_TUNING, load_stages=0)):
        g = plan.geometry(x, x, tuning, SMS)
        plain = sites.gradient_sums_site(g, False, True, True, True).meta
        masked = sites.gradient_sums_site(g, True, True, True, True).meta
        pipelined = tuning.load_stages > 1
        assert ("maxnreg" in masked) == pipelined and ("maxnreg" in plain) == (pipelined or dtype == torch.float32)
        halved = pipelined and dtype.itemsize == 2
        assert masked["BLOCK_M"] == plain["BLOCK_M"] // (2 if halved else 1), masked
        assert masked["STAGES"] == (2 * plain["STAGES"] - 1 if halved else plain["STAGES"]), masked
        if pipelined:  # buffers x rows: the same shared memory
            assert (masked["STAGES"] - 1) * masked["BLOCK_M"] == (plain["STAGES"] - 1) * plain["BLOCK_M"]
        assert g.plan.rows_per_program % masked["BLOCK_M"] == 0


@pytest.mark.parametrize("shape, dtype, channels, plain_cap, relu_cap", [
    ((64, 440, 7, 7), torch.float32, None, 64, 128),       # groups of 4 fp32 channels
    ((32, 256, 14, 14), torch.bfloat16, None, 128, 128),   # pairs of 14x14 bf16 channels
    ((64, 440, 7, 7), torch.float16, None, 128, 128),      # groups of 8
    ((64, 24, 7, 7), torch.float32, 30, None, None),       # batch rows not aligned: 32-bit loads, uncapped
    ((64, 128, 56, 56), torch.float32, None, None, None),  # single channels
], ids=str)
def test_the_channel_groups_gradient_sums_are_capped_where_they_load_16_bytes(shape, dtype, channels, plain_cap,
                                                                             relu_cap):
    """The channel groups' split gradient sums with ALIGN take more registers than their grids allow
    uncapped (static model: fp32 78, 2 programs an SM less; 16-bit 138-142, one an SM): fp32 under the
    split cap without the ReLU's mask (it spills with it: MAX_REGISTERS), 16-bit under MAX_REGISTERS."""
    N, C, H, W = shape
    x = torch.empty(N, channels or C, H, W, dtype=dtype, device="meta")[:, :C]
    g = plan.geometry(x, x, dataclasses.replace(plan.GPU_TUNING, on_chip_bytes=0), SMS)
    assert g.plan.splits > 1
    plain = sites.gradient_sums_site(g, False, True, True, True).meta
    masked = sites.gradient_sums_site(g, True, True, True, True).meta
    assert plain.get("maxnreg") == plain_cap and masked.get("maxnreg") == relu_cap
    if plain_cap:
        assert plain["GROUP"] > 1 and plain["ALIGN"] > 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_paired_channels_first_gradient_sums_keep_the_cap_through_a_relu(dtype):
    """The 16-bit channels-first gradient sums with PAIRS over tiles of one row fit the cap with the
    ReLU's mask as well (static model: 80 registers uncapped, 64 and no spill under it)."""
    for epilogue in (False, True):
        recorded = recorded_launches.record("triton", "train_bwd", (64, 64, 112, 112), dtype, "contiguous",
                                            sms=SMS, epilogue=epilogue)
        (sums,) = [launch for launch in recorded if launch.name.startswith("gradient_sums")]
        assert sums.meta.get("maxnreg") == 64 and sums.meta["PAIRS"], (epilogue, sums.meta)


@pytest.mark.parametrize("shape, dtype, pairs", [
    ((64, 64, 112, 112), torch.bfloat16, True),
    ((8, 64, 16, 56, 56), torch.float16, True),
    ((64, 64, 112, 112), torch.float32, True),    # fp32: 4 values a thread
    ((64, 256, 56, 56), torch.float32, True),
    ((64, 64, 112, 112), torch.float64, False),   # fp64: one sum per value
    ((64, 64, 9, 9), torch.float32, False),       # rows of 81 values: no whole 16-byte groups
    ((64, 2048, 7, 7), torch.bfloat16, False),    # channel groups: a pair may straddle two channels
    ((64, 64, 9, 9), torch.bfloat16, False),      # rows of 81 values: Triton cannot give a thread 8 of them
    ((16384, 2048), torch.bfloat16, False),       # channels-last: no channels-first reduction
], ids=str)
def test_channels_first_reductions_sum_pairs_where_threads_hold_whole_groups(shape, dtype, pairs):
    """PAIRS (sites.pairs_of_values): only the channels-first reductions get it, and only
    for 16-bit and fp32 inputs of one channel a program whose rows hold whole 16-byte groups."""
    x = torch.empty(shape, dtype=dtype, device="meta")
    g = plan.geometry(x, x, plan.GPU_TUNING, SMS)
    assert sites.pairs_of_values(g) == (pairs and g.channels_first)
    for job in ("statistics", "single_pass_forward", "gradient_sums", "single_pass_backward"):
        meta = sites.config(g, job)[2]
        assert meta.get("PAIRS", False) == pairs, job
        assert g.channels_first == ("PAIRS" in meta), job
    for job in ("normalize", "input_gradient"):
        assert "PAIRS" not in sites.config(g, job)[2], job


@pytest.mark.parametrize("shape, dtype, folded", [
    ((64, 256, 56, 56), torch.bfloat16, True),    # tiles of 2 rows of 4096 values: a row spans the threads
    ((8, 64, 16, 56, 56), torch.float16, False),  # tiles of one row
    ((64, 256, 28, 28), torch.bfloat16, False),   # rows of 1024 values: 8 warps of 256 split the rows
    ((64, 64, 112, 112), torch.float32, False),   # fp32 tiles of 2 rows: PAIRS alone fits 5 programs an SM
], ids=str)
def test_paired_gradient_sums_fold_the_rows_where_a_row_spans_the_threads(shape, dtype, folded):
    """FOLD_ROWS (sites.folded_rows): the channels-first gradient sums with PAIRS over tiles of several
    rows whose rows each span the program's threads keep one row of lane sums (static model: 80 -> 50
    registers, 61 through the ReLU's mask) and take the register cap; the single pass never folds."""
    x = torch.empty(shape, dtype=dtype, device="meta")
    g = plan.geometry(x, x, plan.GPU_TUNING, SMS)
    assert sites.folded_rows(g) == folded
    meta = sites.config(g, "gradient_sums")[2]
    assert meta["FOLD_ROWS"] == folded
    if folded:
        assert g.plan.rows > 1 and meta["PAIRS"] and meta.get("maxnreg") == 64
    assert "FOLD_ROWS" not in sites.config(g, "statistics")[2]


@pytest.mark.parametrize("C, S, itemsize, adjacent, group", [
    (2048, 49, 4, True, 4),    # 7x7: 4 fp32 rows of 49 values make 196, 49 16-byte words
    (2048, 49, 2, True, 8),    # 8 bf16 rows: 392 values
    (2048, 196, 2, True, 2),   # 14x14 bf16: rows of 196 values start on 8 bytes; two make 392
    (2048, 196, 4, True, 1),   # 14x14 fp32: rows already start on 16 bytes
    (2048, 49, 8, True, 2),    # fp64: 2 values per 16 bytes
    (2050, 49, 4, True, 1),    # C not a multiple of the group
    (2048, 49, 4, False, 1),   # channels not back to back (stride_c != S somewhere)
    (64, 12321, 4, True, 1),   # 111x111: 4 rows would not fit one tile
    (64, 625, 4, True, 1),     # 25x25: 4 rows (10 KB) would not fit 256 places of 16 bytes
    (64, 1, 4, True, 1),
], ids=str)
def test_channel_groups_where_rows_cannot_start_on_16_bytes(C, S, itemsize, adjacent, group):
    tile = plan.GPU_TUNING.tile_elements(itemsize)
    assert plan.channel_group(C, S, itemsize, tile, adjacent) == group
    p = plan.channels_first_plan(64, C, S, itemsize, plan.GPU_TUNING, SMS, adjacent)
    assert p.group == group and p.grid(C)[0] == -(-C // group)
    if group > 1:  # the group's run is one tile row, a multiple of 16 bytes
        assert p.s_blocks == 1 and group * S <= p.block_s and (group * S * itemsize) % 16 == 0
        assert p.align * itemsize == 16


@pytest.mark.parametrize("S, itemsize, adjacent, align", [
    (196, 4, True, 4),      # 14x14 fp32: rows start on 16 bytes, which the JIT cannot see (196 % 16)
    (196, 4, False, 1),     # channels not back to back: a channel's offset may not be a multiple of 4
    (100, 4, True, 4),      # 10x10
    (3136, 4, True, 1),     # 56x56: S % 16 == 0, which the JIT sees itself
    (200, 2, True, 8),      # bf16 rows of 200 values: 400 bytes
    (196, 2, True, 8),      # 14x14 bf16: grouped in pairs, the run aligned
    (98, 4, True, 4),       # 7x14 fp32: rows start on 8 bytes; grouped in pairs, the run aligned
], ids=str)
def test_rows_that_start_on_16_bytes_are_marked_aligned(S, itemsize, adjacent, align):
    """ALIGN tells the Triton kernels that every channel's offset and the run of a row are whole
    16-byte words: for channel groups, and for single channels whose S is a multiple of a 16-byte
    word's values but not of 16 (the JIT specializes integers on divisibility by 16 only)."""
    p = plan.channels_first_plan(64, 256, S, itemsize, plan.GPU_TUNING, SMS, adjacent)
    assert p.align == align
    if align > 1:
        assert (p.group * S) % align == 0 and align * itemsize == 16


@pytest.mark.parametrize("shape, dtype, channels, align", [
    ((64, 24, 7, 7), torch.float32, None, 4),     # groups of 4 channels; batch rows of 1176 values
    ((64, 40, 7, 7), torch.bfloat16, None, 8),    # groups of 8; 1960 values
    ((64, 24, 7, 7), torch.float32, 30, 1),       # 24 of 30 channels: batch rows start on 8 bytes
    ((64, 24, 7, 7), torch.float32, 32, 4),       # 24 of 32: 1568 values
    ((32, 22, 14, 14), torch.float32, None, 4),   # single channels of 196 values; batch rows of 4312
    ((32, 21, 14, 14), torch.bfloat16, None, 1),  # pairs of channels do not divide 21: single, unaligned
], ids=str)
def test_channels_first_batch_rows_must_start_on_16_bytes_too(shape, dtype, channels, align):
    """ALIGN of the channels-first kernels: the plan's where every tensor's batch stride is a multiple
    of it as well (kernels rebuild it with `aligned`); 1 where one is not, whatever the plan's."""
    N, C, H, W = shape
    x = torch.empty(N, channels or C, H, W, dtype=dtype, device="meta")[:, :C]
    g = plan.geometry(x, None, plan.GPU_TUNING, SMS)
    assert g.channels_first and g.x.stride_n == (channels or C) * H * W
    assert g.plan.align > 1 or align == 1
    assert sites.row_alignment(g) == align and sites.config(g, "normalize")[2]["ALIGN"] == align
    dense = torch.empty(shape, dtype=dtype, device="meta")
    assert sites.row_alignment(plan.geometry(dense, x, plan.GPU_TUNING, SMS)) == align  # dy's rows too


def test_ghost_batch_norm_channels_first_aligns_its_virtual_batches_only_where_their_offset_is_aligned():
    """A channels-first virtual batch starts (N / G) x C x S values after the previous one: the GHOST
    kernels' offset is aligned with the batch rows (a channel slice, which Ghost BatchNorm copies
    first, shows the check)."""
    from bn_gpu.backends import ghost
    aligned = ghost.geometry(torch.empty(32, 24, 7, 7, device="meta"), 4, plan.GPU_TUNING, SMS)
    assert aligned.plan.group == 4 and aligned.chunk_extra % 4 == 0 and sites.row_alignment(aligned) == 4
    sliced = ghost.geometry(torch.empty(32, 30, 7, 7, device="meta")[:, :24], 4, plan.GPU_TUNING, SMS)
    assert sliced.plan.group == 4 and sites.row_alignment(sliced) == 1


def _channels_last(shape, dtype, channels=None):
    """A channels-last meta tensor; with `channels`, the first C of that many channels (a row stride
    of `channels` values)."""
    N, C, H, W = shape
    return torch.empty(N, H, W, channels or C, dtype=dtype, device="meta")[..., :C].permute(0, 3, 1, 2)


@pytest.mark.parametrize("shape, dtype, channels, align", [
    ((8, 24, 5, 6), torch.float32, None, 4),    # rows of 96 bytes: whole words the JIT cannot see
    ((8, 24, 5, 6), torch.bfloat16, None, 8),   # 48 bytes
    ((8, 24, 5, 6), torch.float64, None, 2),
    ((8, 64, 5, 6), torch.float32, None, 1),    # 64 channels: the JIT sees it itself
    ((8, 20, 5, 6), torch.bfloat16, None, 1),   # rows of 40 bytes
    ((8, 24, 5, 6), torch.float32, 40, 4),      # 24 of 40 channels: rows of 160 bytes
    ((8, 24, 5, 6), torch.float32, 26, 1),      # 24 of 26: rows start on 8 bytes
], ids=str)
def test_channels_last_rows_that_start_on_16_bytes_are_marked_aligned(shape, dtype, channels, align):
    """ALIGN of the channels-last kernels: C and every tensor's row stride multiples of a 16-byte
    word's values, not all of 16."""
    x = _channels_last(shape, dtype, channels)
    g = plan.geometry(x, None, plan.GPU_TUNING, SMS)
    assert not g.channels_first and g.x.stride_m == (channels or shape[1])
    assert sites.column_alignment(g) == align
    meta = sites.config(g, "normalize")[2]
    assert meta["ALIGN"] == align
    dense = _channels_last(shape, dtype)
    assert sites.column_alignment(plan.geometry(dense, x, plan.GPU_TUNING, SMS)) == align  # dy's rows too


def test_ghost_batch_norm_channels_last_aligns_its_virtual_batches_only_where_their_offset_is_aligned():
    """Ghost BatchNorm's virtual channels (G x C) may be a multiple of a word's values where C is not:
    its virtual batches' offset must be one too."""
    from bn_gpu.backends import ghost
    aligned = ghost.geometry(_channels_last((32, 24, 4, 4), torch.float32), 4, plan.GPU_TUNING, SMS)
    assert sites.column_alignment(aligned) == 4
    odd = ghost.geometry(_channels_last((32, 6, 4, 4), torch.float32), 4, plan.GPU_TUNING, SMS)
    assert odd.C == 24 and sites.column_alignment(odd) == 1


def test_the_geometry_groups_channels_only_where_every_tensor_has_them_back_to_back():
    x = torch.empty(64, 2048, 7, 7, device="meta")
    assert plan.geometry(x, None, plan.GPU_TUNING, SMS).plan.group == 4
    assert plan.geometry(x, x, plan.GPU_TUNING, SMS).plan.group == 4
    grad = torch.empty(64, 7, 7, 2048, device="meta").permute(0, 3, 1, 2)  # channels-last dy: copied to x's family
    assert plan.geometry(x, grad, plan.GPU_TUNING, SMS).plan.group == 4
    every_other = torch.empty(64, 4096, 7, 7, device="meta")[:, ::2]  # stride_c = 2 S
    assert plan.geometry(every_other, None, plan.GPU_TUNING, SMS).plan.group == 1
    g = plan.geometry(x, None, plan.GPU_TUNING, SMS)
    assert g.finalize_groups == 512 and g.finalize_counters == 512 * (g.finalize.split_groups + 1)
    assert plan.geometry(x, None, dataclasses.replace(plan.GPU_TUNING, channel_groups=False), SMS).plan.group == 1


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in FREE:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def launches(monkeypatch):
    """Counts Triton launches (replaced by no-ops) and torch operations of the Triton backend."""
    counted = []
    monkeypatch.setattr(launcher, "launch",
                        lambda site, pointers, floats=(): counted.append(
                            site.kernel.__name__.replace("_channels_first", "").replace("_channels_last", "")))

    def run(fn):
        counted.clear()
        with _Count() as torch_ops:
            fn()
        return counted + torch_ops.ops

    return run


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_launch_budget(launches, kernel_path, layout, momentum):
    shape = (4, 3, 5, 7) if kernel_path == "on-chip" else (4, 6, 12, 12)  # the first fits on chip
    C = shape[1]
    x = make_input(shape, layout=layout)
    weight, bias, running_mean, running_var = make_params(C)
    tracked = torch.tensor(1)
    mean, invstd = torch.zeros(C), torch.ones(C)
    def train_step():
        return triton_backend.forward_train(x, weight, bias, running_mean, running_var, tracked, momentum, 1e-5)

    train_step()  # the first call on a stream allocates the fused finalize's counters (zeros, once)
    train = launches(train_step)
    if kernel_path == "single-pass":
        assert train == ["single_pass_forward"], train  # the batch counted by the kernel, also cumulatively
    elif kernel_path == "on-chip":
        assert train == ["on_chip_forward"], train
    else:
        assert train == ["statistics", "normalize"], train
    assert launches(lambda: triton_backend.forward_eval(x, weight, bias, running_mean, running_var, 1e-5)) == \
        ["normalize"]
    backward = launches(lambda: triton_backend.backward(x, x, weight, mean, invstd, True, True, True))
    assert backward == {"single-pass": ["single_pass_backward"], "on-chip": ["on_chip_backward"]}.get(
        kernel_path, ["gradient_sums", "input_gradient"]), backward
    assert launches(lambda: triton_backend.backward(x, x, weight, mean, invstd, False, True, False)) == \
        ["input_gradient"]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_a_training_step_allocates_its_outputs_and_nothing_else(launches, kernel_path, layout):
    """The partials of the split reductions and the backward's totals die within the call: they
    live in workspaces kept per stream (orchestration.workspace), so once a stream has them a
    training forward allocates y, mean and invstd, and a backward dx, dweight and dbias."""
    x = make_input((4, 6, 12, 12), layout=layout)
    weight, bias, running_mean, running_var = make_params(6)
    tracked = torch.tensor(1)
    mean, invstd = torch.zeros(6), torch.ones(6)

    def allocations(step):
        step()  # the first call on a stream takes the workspaces and counters
        with Allocations() as seen:
            step()
        return sorted(seen.shapes)

    forward = allocations(lambda: triton_backend.forward_train(x, weight, bias, running_mean, running_var, tracked,
                                                               0.1, 1e-5))
    assert forward == sorted([tuple(x.shape), (6,), (6,)]), forward
    backward = allocations(lambda: triton_backend.backward(x, x, weight, mean, invstd, True, True, True))
    assert backward == sorted([tuple(x.shape), (6,), (6,)]), backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=str)
def test_the_16_bit_channels_last_normalize_with_a_residual_walks_half_tiles(dtype, memory_format):
    """With a residual, the 16-bit channels-last normalize walks tiles of half the plan's rows (the
    static model: 74 registers at the plan's, 64 at half, 4 programs an SM); its program's rows stay
    a whole number of them. Every other normalize keeps the plan's tiles."""
    x = torch.empty((64, 64, 112, 112), device="meta", dtype=dtype).contiguous(memory_format=memory_format)
    g = plan.geometry(x, x, plan.GPU_TUNING, SMS)
    for residual in (False, True):
        meta = sites.normalize_site(g, True, True, False, True, residual, residual).meta
        if g.channels_first:
            assert "BLOCK_M" not in meta
            continue
        halved = residual and dtype.itemsize == 2
        assert meta["BLOCK_M"] == g.plan.block_m // (2 if halved else 1), (residual, meta)
        assert g.plan.rows_per_program % meta["BLOCK_M"] == 0


@pytest.mark.parametrize("shape, dtype, halved", [
    ((16384, 2048), torch.float32, True),                      # 128 channels a program
    ((64, 64, 112, 112), torch.float32, False),                # 64 channels a program: capped instead
    ((16384, 2048), torch.bfloat16, False),
], ids=str)
def test_the_fp32_channels_last_dx_through_a_relu_walks_half_tiles_at_128_channels(shape, dtype, halved):
    """Through the ReLU's mask the fp32 channels-last dx of 128 channels a program walks tiles of half
    the plan's rows (static model: 72 registers at the plan's, 52 at half: 4 programs an SM); without
    the mask, and at 64 channels a program, it keeps the plan's tiles."""
    x = torch.empty(shape, device="meta", dtype=dtype)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    g = plan.geometry(x, x, plan.GPU_TUNING, SMS)
    assert not g.channels_first
    for relu in (False, True):
        meta = sites.input_gradient_site(g, True, True, True, relu).meta
        assert meta["BLOCK_M"] == g.plan.block_m // (2 if relu and halved else 1), (relu, meta)
        assert g.plan.rows_per_program % meta["BLOCK_M"] == 0


@pytest.mark.parametrize("dtype, halved", [
    (torch.bfloat16, True),    # 155 registers at the plan's 16 rows: one program an SM
    (torch.float16, True),
    (torch.float32, False),    # 4 programs an SM at half would hold more between the passes than the L2 keeps
], ids=str)
def test_the_16_bit_channel_groups_single_pass_backward_walks_half_tiles(dtype, halved):
    """The channels-first single-pass backward of 16-bit channel groups walks tiles of half the plan's
    rows, and the tiling it is launched with counts those tiles; fp32 keeps the plan's."""
    x = torch.empty((64, 2048, 7, 7), device="meta", dtype=dtype)
    g = plan.geometry(x, x, plan.GPU_TUNING, SMS)
    assert g.plan.group > 1 and g.plan.splits == 1
    for relu in (False, True):
        site = sites.single_pass_backward_site(g, True, relu, True, True, relu)
        rows = site.meta["ROWS"]
        assert rows == g.plan.rows // (2 if halved else 1), (relu, site.meta)
        assert site.tail == (g.plan.s_blocks, -(-g.N // rows) * g.plan.s_blocks)
