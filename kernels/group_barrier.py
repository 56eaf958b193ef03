"""A barrier among the programs of one channel group, for the on-chip kernels (channels_first.py,
channels_last.py: on_chip_*): each program holds its slice of the input in registers, publishes its
partials, waits here for the group's other programs, and finishes from the merged totals without
reading the input again.

Every program of a group must be resident at once: a program waiting here keeps its SM, so a
program that cannot start would never arrive. The launch plan bounds the grid by the programs an
SM holds (bn_gpu.backends.plan.on_chip_plan) and the Triton launcher checks each compiled kernel's
occupancy against that bound before its first launch (bn_gpu.backends.triton.launcher).

A counter per group, zero between launches: a program adds 1 on arrival and spins until the
counter reaches the group's size, then adds 1 more when it has read what it needed; the program
that brings it to twice the size is the last to leave, when every other has passed its wait, and
sets it back to zero for the next launch and for CUDA-graph replay.
"""
import triton
import triton.language as tl


@triton.jit
def wait_for_group(
    counter_ptr,  # (groups,) int32, zero between launches
    group, parties,
):
    """Arrive at counter `group`, then wait until all `parties` programs of the group have arrived.
    The block barrier puts every thread's stores (the partials) before the release of the arrival
    (cumulative, at GPU scope); the acquire of the spin puts the other programs' stores before this
    program's reads, which go to L2 (.cg: an SM's L1 is not coherent with other SMs' stores)."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr + group, 1, sem="release", scope="gpu")
    arrived = tl.atomic_add(counter_ptr + group, 0, sem="acquire", scope="gpu")
    while arrived < parties:
        arrived = tl.atomic_add(counter_ptr + group, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def leave_group(
    counter_ptr,  # (groups,) int32
    group, parties,
):
    """Count this program out of the group's exchange (after its last read of the partials); the
    last to leave sets the counter back to zero."""
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr + group, 1, sem="acq_rel", scope="gpu")
    if ticket == 2 * parties - 1:
        tl.atomic_xchg(counter_ptr + group, 0, sem="relaxed", scope="gpu")
