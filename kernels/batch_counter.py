"""num_batches_tracked, counted on the device so that training steps need no host round trip."""
import triton
import triton.language as tl

from .finalize import last_of_group


@triton.jit
def count_batch(num_batches_tracked_ptr, is_first_program):
    """num_batches_tracked += 1, done by one program of the grid."""
    count = tl.load(num_batches_tracked_ptr)
    tl.store(num_batches_tracked_ptr, count + 1, mask=is_first_program)


@triton.jit
def count_batch_after_every_read(
    num_batches_tracked_ptr,  # () int64
    counter_ptr,              # (1,) int32 zero, left at zero
):
    """num_batches_tracked += 1, done by the last program of the grid to get here: a cumulative
    average's programs each read the count (store_statistics) before they count themselves done."""
    programs = tl.num_programs(0) * tl.num_programs(1)
    if last_of_group(counter_ptr, 0, programs):
        tl.store(counter_ptr, 0)
        tl.store(num_batches_tracked_ptr, tl.load(num_batches_tracked_ptr) + 1)


@triton.jit
def count_batch_once(
    num_batches_tracked_ptr,  # () int64
    counter_ptr,              # (1,) int32 zero when CUMULATIVE, left at zero
    CUMULATIVE: tl.constexpr,
):
    """num_batches_tracked += 1, once a launch: after every program's read of it where a cumulative
    average reads it (count_batch_after_every_read), else by the grid's first program."""
    if CUMULATIVE:
        count_batch_after_every_read(num_batches_tracked_ptr, counter_ptr)
    else:
        count_batch(num_batches_tracked_ptr, (tl.program_id(0) + tl.program_id(1)) == 0)
