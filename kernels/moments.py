"""Chan's parallel merge of partial moments (count, mean, M2).

Partial statistics are kept as (count, mean, M2 = sum of squared deviations from the mean), never
as (sum, sum of squares): E[x^2] - E[x]^2 cancels catastrophically when |mean| >> std.
"""
import triton
import triton.language as tl  # noqa: F401  (the Triton interpreter wants it in a kernel module's globals)


@triton.jit
def merge_moments(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Merge two partials; count_b must be positive (count_a may be zero)."""
    count = count_a + count_b
    delta = mean_b - mean_a
    weight_b = count_b / count
    mean = mean_a + delta * weight_b
    m2 = m2_a + m2_b + delta * delta * count_a * weight_b
    return count, mean, m2

