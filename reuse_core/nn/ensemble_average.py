from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..ops import ensemble_average


class EnsembleAverage(nn.Module):
    """Weighted average of K members' outputs on the fused kernel.

    With ``learnable=True`` the weights are ``softmax(weight_logits)``: non-negative and summing
    to 1 for any value of the free parameters, so an optimiser can learn them without leaving the
    valid set. ``init_weights`` (non-negative, positive sum) sets the starting point; a softmax
    weight's gradient is proportional to the weight itself, so zeros in it start at 1e-3 of the
    total instead (still small, but able to grow). With ``learnable=False`` the normalised
    ``init_weights`` are a fixed buffer, zeros included.

    >>> head = EnsembleAverage(3, mode="log_probs")
    >>> log_probs = head([m(x) for m in members])  # doctest: +SKIP
    """

    def __init__(self, num_members: int, mode: str = "probs", learnable: bool = True,
                 init_weights: Sequence[float] | torch.Tensor | None = None):
        super().__init__()
        if int(num_members) < 1:
            raise ValueError(f"num_members must be >= 1, got {num_members}")
        self.num_members = int(num_members)
        self.mode = mode
        if init_weights is None:
            w = torch.full((self.num_members,), 1.0 / self.num_members)
        else:
            w = torch.as_tensor(init_weights, dtype=torch.float32)
            if w.shape != (self.num_members,) or bool((w < 0).any()) or not bool(w.sum() > 0):
                raise ValueError(f"init_weights must be {self.num_members} non-negative numbers with a positive sum")
            w = w / w.sum()
        self.learnable = bool(learnable)
        if self.learnable:
            self.weight_logits = nn.Parameter(torch.log(w.clamp_min(1e-3)))
        else:
            self.register_buffer("fixed_weights", w)

    @property
    def weights(self) -> torch.Tensor:
        """The normalised member weights (non-negative, summing to 1)."""
        return torch.softmax(self.weight_logits, dim=0) if self.learnable else self.fixed_weights

    def forward(self, member_logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        return ensemble_average(member_logits, self.weights, mode=self.mode)

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, mode={self.mode!r}"
