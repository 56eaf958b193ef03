"""num_batches_tracked, counted on the device so that training steps need no host round trip."""
import triton
import triton.language as tl


@triton.jit
def count_batch(num_batches_tracked_ptr, is_first_program):
    """num_batches_tracked += 1, done by one program of the grid."""
    count = tl.load(num_batches_tracked_ptr)
    tl.store(num_batches_tracked_ptr, count + 1, mask=is_first_program)
