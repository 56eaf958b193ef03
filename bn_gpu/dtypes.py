"""Dtype policy shared by every backend."""
import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype and dtype of the saved mean/invstd: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32
