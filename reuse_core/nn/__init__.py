"""nn.Module wrappers of the fused ops."""
from .attention import FusedMultiheadAttention
from .distillation_loss import DistillationLoss
from .ensemble_average import EnsembleAverage

__all__ = ["DistillationLoss", "EnsembleAverage", "FusedMultiheadAttention"]
