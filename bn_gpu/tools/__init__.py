"""bn_gpu's tooling, which the runtime never imports: the command line and what it runs.

    commands.py   bn-gpu / python -m bn_gpu: demo, preflight, bench, plot, model
    cli.py        argument types and one-line usage errors shared by the commands and profiling/
    demo.py       the seed's worked example through the kernels
    preflight.py  one tiny case of every op, backend, layout and kernel path against float64
    bench.py      bn_gpu against cuDNN, PyTorch's native kernels and torch.compile; report.py its tables
    launches.py   every launch of an op recorded without a GPU (meta tensors)
    model/        the static performance model of those launches on a described GPU
"""
