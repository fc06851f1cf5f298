from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..ops import ensemble_average


class EnsembleAverage(nn.Module):
    """Weighted average of K members' outputs on the fused kernel.

    The weights are ``softmax(weight_logits)``: non-negative and summing to 1 for any value of the
    free parameters, so an optimiser can learn them (``learnable=True``) without leaving the valid
    set. ``init_weights`` (non-negative, positive sum) sets the starting point; zeros in it are
    approximated by a very small weight so they can still move. With ``learnable=False`` the
    weights are a fixed buffer.

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
            logits = torch.zeros(self.num_members)
        else:
            w = torch.as_tensor(init_weights, dtype=torch.float32)
            if w.shape != (self.num_members,) or bool((w < 0).any()) or not bool(w.sum() > 0):
                raise ValueError(f"init_weights must be {self.num_members} non-negative numbers with a positive sum")
            logits = torch.log((w / w.sum()).clamp_min(1e-12))
        if learnable:
            self.weight_logits = nn.Parameter(logits)
        else:
            self.register_buffer("weight_logits", logits)

    @property
    def weights(self) -> torch.Tensor:
        """The normalised member weights (non-negative, summing to 1)."""
        return torch.softmax(self.weight_logits, dim=0)

    def forward(self, member_logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        return ensemble_average(member_logits, self.weights, mode=self.mode)

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, mode={self.mode!r}"
