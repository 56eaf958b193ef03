"""Alignment the Triton JIT cannot see for itself.

The JIT specializes an integer parameter on divisibility by 16 only, so rows of 196 fp32 values (a
14x14 plane), of 24 channels (channels-last) or batch rows of 24 7x7 planes look unaligned to it
although every row starts on 16 bytes: it then loads 4 or 2 bytes at a time. Where the plan checked
that a size or stride is a multiple of a 16-byte word's values (ALIGN), the kernels rebuild it with
`aligned`, which the compiler can see through; tl.multiple_of cannot mark a parameter (it marks the
operation that made a value, and a parameter has none).
"""
import triton
import triton.language as tl


@triton.jit
def aligned(value, ALIGN: tl.constexpr):
    """value (a multiple of ALIGN: the plan's promise), as a multiple of ALIGN to the compiler."""
    if ALIGN > 1:
        value = value // ALIGN * ALIGN
    return value
