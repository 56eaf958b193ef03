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
    mean = merged_mean(mean_a, mean_b, delta, weight_b)
    m2 = m2_a + m2_b + delta * delta * count_a * weight_b
    return count, mean, m2


@triton.jit
def merged_mean(mean_a, mean_b, delta, weight_b):
    """The mean of two partials, b weighing weight_b: mean_a + delta * weight_b (Chan), or, where
    delta = mean_b - mean_a is not finite (an inf among the values), the weighted mean: that inf, or
    NaN for +inf and -inf, as the plain sum of the values gives (and torch's mean)."""
    return tl.where(delta - delta == 0.0, mean_a + delta * weight_b, mean_a * (1.0 - weight_b) + mean_b * weight_b)


@triton.jit
def finite_shift(value):
    """A value of x as its channel's shift, or 0 where it is inf or NaN: moments of x - inf would
    make every finite value -inf and the mean NaN, where a batch holding an inf has that inf as its
    mean (as torch's)."""
    return tl.where(value - value == 0.0, value, 0.0)
