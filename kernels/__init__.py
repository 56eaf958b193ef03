"""Device code of bn_gpu: Triton kernels (and, for the CuPy backend, CUDA C sources).

Installed as ``bn_gpu.kernels``. Nothing here allocates or launches: the launch functions live in
``bn_gpu.triton_backend``.

    channels_first.py  statistics, normalize, backward reduction, dx and the single-pass kernels for
                       contiguous N,C,(D,)(H,)W
    channels_last.py   the same for channels_last / channels_last_3d / (N, C) inputs
    finalize.py        per-channel merges of the partials: mean, invstd, running stats, dweight, dbias
    moments.py         Chan's merge of (count, mean, M2) partials
    batch_counter.py   num_batches_tracked += 1 on the device
    batch_norm.cu      all of the above in CUDA C, for the CuPy backend (compiled at run time by NVRTC)
"""
