"""An ensemble as one module: K members (any architectures with the same classes) combined by the
fused :func:`~reuse_core.ops.ensemble_average` or by a majority vote."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..ops import ensemble_average
from .weights import majority_vote, uniform_weights

COMBINES = ("logits", "probs", "log_probs", "vote")
# The smallest vote share kept in the log domain: a class without votes gets log(1e-9), not -inf,
# so a cross-entropy over the votes stays finite.
_MIN_SHARE = 1e-9


class Ensemble(nn.Module):
    """``forward(x)`` gives the ensemble's scores in the log domain: their softmax is its predictive
    distribution and their argmax its prediction, so it drops in wherever a classifier's logits go
    (evaluation, a distillation teacher).

    ``combine``: "logits" averages the members' logits; "probs" and "log_probs" average their
    probabilities (one rule: the output is the log of the average, computed stably by the op's
    "log_probs" mode; :meth:`predict_proba` gives the average itself through the "probs" mode);
    "vote" takes the weighted share of the members' top-1 votes. ``weights``: non-negative, one per
    member (default uniform); normalised.
    """

    def __init__(self, members: Sequence[nn.Module], *, combine: str = "probs",
                 weights: Sequence[float] | torch.Tensor | None = None):
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
        self.members = nn.ModuleList(members)
        K = len(self.members)
        if K == 0:
            raise ValueError("an ensemble needs at least one member")
        w = uniform_weights(K) if weights is None else torch.as_tensor(weights, dtype=torch.float32).detach().clone()
        if w.shape != (K,) or bool((w < 0).any()) or not bool(w.sum() > 0):
            raise ValueError(f"weights must be {K} non-negative numbers with a positive sum, got {w.tolist()}")
        self.register_buffer("weights", w / w.sum())
        self.combine = combine

    def member_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [m(x) for m in self.members]

    def combine_logits(self, member_logits: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The ensemble's scores from its members' outputs (``(K, ..., C)`` or K tensors)."""
        if self.combine == "vote":
            return majority_vote(member_logits, self.weights).clamp_min(_MIN_SHARE).log()
        mode = "logits" if self.combine == "logits" else "log_probs"
        return ensemble_average(member_logits, self.weights.to(_dtype(member_logits)), mode=mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine_logits(self.member_logits(x))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        z = self.member_logits(x)
        if self.combine in ("probs", "log_probs"):
            return ensemble_average(z, self.weights.to(_dtype(z)), mode="probs")
        return torch.softmax(self.combine_logits(z), dim=-1)

    def extra_repr(self) -> str:
        return f"combine={self.combine!r}, weights={[round(w, 4) for w in self.weights.tolist()]}"


def _dtype(member_logits) -> torch.dtype:
    first = member_logits if isinstance(member_logits, torch.Tensor) else member_logits[0]
    return torch.float64 if first.dtype == torch.float64 else torch.float32


def collect_logits(models: Sequence[nn.Module], batches: Iterable, device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every model's outputs over a whole data loader (batches of (inputs, targets)), in eval mode and
    without grad: ``(K, N, C)`` member logits and ``(N,)`` targets, float32 on the CPU."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    outs, targets = [[] for _ in models], []
    try:
        with torch.no_grad():
            for x, y in batches:
                x = x.to(device)
                for k, m in enumerate(models):
                    outs[k].append(m(x).float().cpu())
                targets.append(torch.as_tensor(y))
    finally:
        for m, t in zip(models, modes):
            m.train(t)
    if not targets:
        raise ValueError("collect_logits: the data is empty")
    return torch.stack([torch.cat(o) for o in outs]), torch.cat(targets)
