"""The float64 reference against the seed's hand-computed example (docs/semantics.md) and against autograd."""
import pytest
import torch

from bn_gpu import reference as ref

# The seed's data set: 20 samples of 3 features, row i = (i, i + 1, i + 2), in mini-batches of 5.
SEED_DATA = torch.tensor([[i, i + 1.0, i + 2.0] for i in range(1, 21)], dtype=torch.float64)


def test_seed_batch_statistics():
    mean, var = ref.batch_stats(SEED_DATA[:5])
    torch.testing.assert_close(mean, torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(var, torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64))
    mean, var = ref.batch_stats(SEED_DATA[5:10])
    torch.testing.assert_close(mean, torch.tensor([8.0, 9.0, 10.0], dtype=torch.float64))
    torch.testing.assert_close(var, torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64))


def test_seed_normalized_values():
    y, mean, var, invstd = ref.forward_train(SEED_DATA[:5])
    # First row: (1 - 3) / sqrt(2 + 1e-5) = -1.41421 (seed step 4), the same in every feature.
    torch.testing.assert_close(y[0], torch.full((3,), -1.41421, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[2], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(invstd, 1 / torch.sqrt(var + 1e-5))


def test_seed_running_statistics():
    running_mean = torch.zeros(3, dtype=torch.float64)
    running_var = torch.ones(3, dtype=torch.float64)
    for b, batch in enumerate(SEED_DATA.split(5)):
        mean, var = ref.batch_stats(batch)
        running_mean, running_var = ref.update_running_stats(running_mean, running_var, mean, var, 5, 0.1)
        if b == 0:
            torch.testing.assert_close(running_mean, torch.tensor([0.3, 0.4, 0.5], dtype=torch.float64))
            torch.testing.assert_close(running_var, torch.full((3,), 1.15, dtype=torch.float64))
    torch.testing.assert_close(running_mean, torch.tensor([3.8367, 4.1806, 4.5245], dtype=torch.float64),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(running_var, torch.full((3,), 1.51585, dtype=torch.float64), atol=1e-5, rtol=0)


def test_seed_biased_running_variance_variant():
    mean, var = ref.batch_stats(SEED_DATA[:5])
    _, running_var = ref.update_running_stats(torch.zeros(3), torch.ones(3), mean, var, 5, 0.1, unbiased=False)
    torch.testing.assert_close(running_var, torch.full((3,), 1.1, dtype=torch.float64))


def test_cumulative_average_factor():
    """momentum=None: after t batches the running statistics are the plain average of the t batch
    statistics (starting from the first batch), which the factor 1 / t gives."""
    batches = [torch.randn(6, 3, dtype=torch.float64) * (t + 1) + t for t in range(4)]
    running_mean, running_var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for t, x in enumerate(batches, start=1):
        mean, var = ref.batch_stats(x)
        running_mean, running_var = ref.update_running_stats(running_mean, running_var, mean, var, 6,
                                                             ref.momentum_factor(None, t))
    torch.testing.assert_close(running_mean, torch.stack([ref.batch_stats(x)[0] for x in batches]).mean(0))
    torch.testing.assert_close(running_var, torch.stack([x.var(0) for x in batches]).mean(0))
    assert ref.momentum_factor(0.1, 4) == 0.1


@pytest.mark.parametrize("shape", [(7, 3), (4, 3, 5), (2, 3, 4, 5), (2, 2, 3, 2, 3)])
def test_reference_matches_torch_functional(shape):
    x = torch.randn(shape, dtype=torch.float64) * 2 + 3
    w, b = torch.rand(3 if shape[1] == 3 else shape[1], dtype=torch.float64) + 0.5, torch.randn(shape[1], dtype=torch.float64)
    rm, rv = torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)
    expected = torch.nn.functional.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
    y, mean, var, _ = ref.forward_train(x, w, b, 1e-5)
    torch.testing.assert_close(y, expected)
    new_rm, new_rv = ref.update_running_stats(torch.zeros_like(rm), torch.ones_like(rv), mean, var,
                                              x.numel() // shape[1], 0.1)
    torch.testing.assert_close(new_rm, rm)
    torch.testing.assert_close(new_rv, rv)
    torch.testing.assert_close(ref.forward_eval(x, rm, rv, w, b),
                               torch.nn.functional.batch_norm(x, rm, rv, w, b, training=False))


@pytest.mark.parametrize("affine", [True, False])
def test_closed_form_backward_matches_autograd(affine):
    x = (torch.randn(6, 4, 3, dtype=torch.float64) * 2 + 3).requires_grad_()
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(4, dtype=torch.float64).requires_grad_() if affine else None
    dy = torch.randn(6, 4, 3, dtype=torch.float64)
    y, *_ = ref.forward_train(x, w, b)
    y.backward(dy)
    grad_x, grad_w, grad_b = ref.backward_train(dy, x.detach(), None if w is None else w.detach())
    torch.testing.assert_close(grad_x, x.grad)
    if affine:
        torch.testing.assert_close(grad_w, w.grad)
        torch.testing.assert_close(grad_b, b.grad)


def test_eval_backward_matches_autograd():
    x = (torch.randn(6, 4, 3, dtype=torch.float64) * 2 + 3).requires_grad_()
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64).requires_grad_()
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    dy = torch.randn(6, 4, 3, dtype=torch.float64)
    ref.forward_eval(x, rm, rv, w, b).backward(dy)
    grad_x, grad_w, grad_b = ref.backward_eval(dy, x.detach(), rm, rv, w.detach())
    torch.testing.assert_close(grad_x, x.grad)
    torch.testing.assert_close(grad_w, w.grad)
    torch.testing.assert_close(grad_b, b.grad)
