"""The fused ops, callable from any PyTorch training code."""
from .distill_kl import distill_kl_loss

__all__ = ["distill_kl_loss"]
