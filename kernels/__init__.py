"""Device code of bn_gpu: Triton kernels, and the same kernels in CUDA C for the CuPy backend.

Installed as ``bn_gpu.kernels``. Nothing here allocates or launches: ``bn_gpu.backends.orchestration``
owns the control flow, ``bn_gpu.backends.triton`` and ``bn_gpu.backends.cupy`` marshal the arguments.
One name per kernel in both languages: ``<job>_<layout>`` with jobs statistics, normalize,
single_pass_forward, gradient_sums, input_gradient, single_pass_backward, and finalize_statistics,
finalize_gradients.

    channels_first.py  statistics, normalize, gradient sums, input gradient and the single-pass
                       kernels for contiguous N,C,(D,)(H,)W
    channels_last.py   the same for channels_last / channels_last_3d / (N, C) inputs
    finalize.py        per-channel merges of the partials: mean, invstd, running stats, dweight, dbias
    moments.py         Chan's merge of (count, mean, M2) partials
    batch_counter.py   num_batches_tracked += 1 on the device
    channel_groups.py  a channels-first program's channel group (rows that cannot start on 16 bytes)
    alignment.py       sizes and strides rebuilt as multiples of a 16-byte word's values (ALIGN)
    group_barrier.py   the on-chip kernels' barrier of a channel group's programs
    ghost.py           Ghost BatchNorm's two-level channel index and its per-virtual-batch finalize
    cuda/              all of the above in CUDA C (compiled at run time by NVRTC): batch_norm.cu holds
                       the kernels, the headers beside it their shared pieces
"""
