"""Member weights for an ensemble, and majority voting.

Everything works on the members' outputs collected once over a data set, ``member_logits``
``(K, N, C)`` with targets ``(N,)``: choosing weights then costs no further forward passes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..nn import EnsembleAverage

WEIGHTINGS = ("uniform", "accuracy", "learned")


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy of scores ``(N, C)`` (or of the last dimension of ``(K, N, C)``, pooled)."""
    return float((logits.argmax(-1) == targets).float().mean())


def member_accuracies(member_logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    return [accuracy(m, targets) for m in member_logits]


def uniform_weights(num_members: int) -> torch.Tensor:
    return torch.full((num_members,), 1.0 / num_members)


def accuracy_weights(accuracies: Sequence[float]) -> torch.Tensor:
    """Weights proportional to each member's (validation) accuracy, summing to 1."""
    acc = torch.tensor([float(a) for a in accuracies])
    if bool((acc < 0).any()) or not bool(acc.sum() > 0):
        raise ValueError(f"accuracy weights need non-negative accuracies with a positive sum, got {acc.tolist()}")
    return acc / acc.sum()


def learn_weights(member_logits: torch.Tensor, targets: torch.Tensor, *, mode: str = "probs",
                  steps: int = 100, lr: float = 0.1, init: torch.Tensor | None = None) -> torch.Tensor:
    """Weights that minimise the combined output's cross-entropy on ``(member_logits, targets)``.

    They are learned through the fused op's gradient, parametrised as a softmax
    (:class:`~reuse_core.nn.EnsembleAverage`), so they stay non-negative and sum to 1. For "probs" and
    "log_probs" the loss is the NLL of the averaged probabilities (both modes combine the same
    distribution); for "logits" the cross-entropy of the averaged logits.
    """
    member_logits = member_logits.detach().float()
    head = EnsembleAverage(member_logits.shape[0], mode="logits" if mode == "logits" else "log_probs",
                           learnable=True, init_weights=init)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        out = head(member_logits)
        loss = F.cross_entropy(out, targets) if mode == "logits" else F.nll_loss(out, targets)
        loss.backward()
        opt.step()
    return head.weights.detach().clone()


def choose_weights(weighting: str, member_logits: torch.Tensor, targets: torch.Tensor, *,
                   mode: str = "probs") -> torch.Tensor:
    """The weights ``weighting`` ("uniform", "accuracy" or "learned") gives on this validation data."""
    if weighting == "uniform":
        return uniform_weights(member_logits.shape[0])
    if weighting == "accuracy":
        return accuracy_weights(member_accuracies(member_logits, targets))
    if weighting == "learned":
        return learn_weights(member_logits, targets, mode=mode)
    raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")


def majority_vote(member_logits: torch.Tensor | Sequence[torch.Tensor],
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Each member votes for its top class; the result is the (weighted) share of votes per class,
    ``(..., C)``, summing to 1 over C. Its argmax is the vote's decision; a tie goes to the lowest
    class index (as scikit-learn's hard voting)."""
    stacked = member_logits if isinstance(member_logits, torch.Tensor) else torch.stack(list(member_logits))
    K, C = stacked.shape[0], stacked.shape[-1]
    w = uniform_weights(K) if weights is None else weights.detach().float() / weights.sum()
    votes = F.one_hot(stacked.argmax(-1), C).float()
    return torch.einsum("k...c,k->...c", votes, w.to(votes.device))
