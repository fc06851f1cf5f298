"""The fused ops, callable from any PyTorch training code."""
from .attention import attention
from .distill_kl import distill_kl_loss
from .ensemble_average import ensemble_average

__all__ = ["attention", "distill_kl_loss", "ensemble_average"]
