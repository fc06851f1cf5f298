"""The fused ops, callable from any PyTorch training code; :func:`empty_cache` gives back the memory
the CPU kernels keep for reusing large outputs."""
from ._ext import empty_cache
from .attention import attention
from .distill_kl import distill_kl_loss
from .ensemble_average import ensemble_average
from .fused_linear_distill import SparseTeacher, fused_linear_distill_loss

__all__ = [
    "SparseTeacher", "attention", "distill_kl_loss", "empty_cache", "ensemble_average", "fused_linear_distill_loss",
]
