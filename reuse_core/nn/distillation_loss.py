from __future__ import annotations

import torch
from torch import nn

from ..ops import distill_kl_loss


class DistillationLoss(nn.Module):
    """Hinton distillation loss on the fused kernel: see :func:`reuse_core.ops.distill_kl_loss`.

    >>> loss_fn = DistillationLoss(temperature=4.0, kd_weight=0.9, ce_weight=0.1)
    >>> loss = loss_fn(student(x), teacher(x).detach(), labels)  # doctest: +SKIP
    """

    def __init__(self, temperature: float = 1.0, kd_weight: float = 1.0, ce_weight: float = 0.0,
                 ignore_index: int = -100, reduction: str = "batchmean"):
        super().__init__()
        self.temperature = temperature
        self.kd_weight = kd_weight
        self.ce_weight = ce_weight
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        return distill_kl_loss(
            student_logits, teacher_logits, labels, temperature=self.temperature, kd_weight=self.kd_weight,
            ce_weight=self.ce_weight, ignore_index=self.ignore_index, reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, kd_weight={self.kd_weight}, ce_weight={self.ce_weight}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")
