"""The seed's worked example run through the real kernels, next to the float64 reference.

20 samples of 3 features (row i = i, i + 1, i + 2), mini-batches of 5, momentum 0.1, running
statistics from mean 0 / variance 1, gamma = 1 and beta (the seed's eta) = 0.
"""
from __future__ import annotations

import os

import torch

SEED_DATA = [[i, i + 1.0, i + 2.0] for i in range(1, 21)]
BATCH = 5
MOMENTUM = 0.1
EPS = 1e-5


def _where_it_runs() -> tuple[str, torch.device, str]:
    """(backend, device, description): the GPU if there is one, else the Triton interpreter."""
    if torch.cuda.is_available():
        return "triton", torch.device("cuda"), f"Triton kernels on {torch.cuda.get_device_name()}"
    # Read when bn_gpu first imports its kernels, at the first call below.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return "triton", torch.device("cpu"), "Triton kernels in the Triton interpreter on the CPU (no GPU found)"


def _fmt(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:9.5f}" for v in t.tolist()) + "]"


def _show(label: str, ours: torch.Tensor, expected: torch.Tensor) -> float:
    error = (ours.double() - expected.double()).abs().max().item()
    print(f"  {label:<14}{_fmt(ours)}   reference {_fmt(expected)}")
    return error


def run() -> float:
    """Walk the example; returns the largest difference from the reference."""
    import bn_gpu
    from bn_gpu import reference as ref

    backend, device, where = _where_it_runs()
    print(f"bn_gpu demo: the seed's mini-batch BatchNorm example, run by {where} (backend={backend!r}).")
    print(f"Data: 20 x 3, row i = (i, i+1, i+2); batches of {BATCH}; momentum {MOMENTUM}; eps {EPS}; "
          "gamma = 1, beta = 0, so y = x_hat.\n")
    data = torch.tensor(SEED_DATA, dtype=torch.float32)
    bn = bn_gpu.BatchNorm1d(3, momentum=MOMENTUM, eps=EPS, backend=backend).to(device)
    ref_mean, ref_var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    worst = 0.0
    for b, batch in enumerate(data.split(BATCH)):
        x = batch.to(device)
        y, mean, invstd = torch.ops.bn_gpu.forward_train(
            x, bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var, bn.num_batches_tracked,
            bn.momentum, bn.eps, backend)
        y_ref, mean_ref, var_ref, invstd_ref = ref.forward_train(batch, eps=EPS)
        ref_mean, ref_var = ref.update_running_stats(ref_mean, ref_var, mean_ref, var_ref, BATCH, MOMENTUM)
        print(f"Batch {b + 1} (samples {BATCH * b + 1}-{BATCH * b + BATCH}):")
        worst = max(worst, _show("mean", mean.cpu(), mean_ref))
        worst = max(worst, _show("variance", (invstd.cpu().double() ** -2 - EPS), var_ref))
        for row in range(BATCH):
            worst = max(worst, _show(f"y row {row + 1}", y[row].cpu(), y_ref[row]))
        worst = max(worst, _show("running_mean", bn.running_mean.cpu(), ref_mean))
        worst = max(worst, _show("running_var", bn.running_var.cpu(), ref_var))
        print("")
    bn.eval()
    print(f"Eval mode (normalized with the running statistics), after {int(bn.num_batches_tracked)} batches:")
    y_eval = bn(data.to(device)).detach().cpu()
    y_eval_ref = ref.forward_eval(data, ref_mean, ref_var, eps=EPS)
    for row in (0, 9, 19):
        worst = max(worst, _show(f"y row {row + 1}", y_eval[row], y_eval_ref[row]))
    print(f"\nLargest difference from the float64 reference: {worst:.2e}")
    print("(running_var uses the unbiased batch variance, as PyTorch; the seed's text uses the biased one.)")
    return worst
