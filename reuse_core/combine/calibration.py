"""Temperature scaling and expected calibration error (Guo et al., 2017)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, *, max_iter: int = 100) -> float:
    """The temperature T > 0 that minimises the NLL of ``softmax(logits / T)`` on (validation) data.

    T is optimised as log T (so it stays positive) with L-BFGS; dividing by T does not change the
    argmax, so accuracy is unchanged and only the confidences move.
    """
    logits = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                               bins: int = 15) -> float:
    """ECE: over ``bins`` equal-width confidence bins, the sample-weighted mean of
    |accuracy - mean confidence|, for ``softmax(logits / temperature)``."""
    probs = torch.softmax(logits.detach().double() / temperature, dim=-1)
    conf, pred = probs.max(-1)
    hit = (pred == targets).double()
    # a confidence of exactly 1 belongs to the last bin
    which = (conf * bins).long().clamp(max=bins - 1)
    n = torch.bincount(which, minlength=bins).double()
    gap = (torch.bincount(which, weights=hit, minlength=bins) - torch.bincount(which, weights=conf, minlength=bins)).abs()
    return float(gap.sum() / n.sum())
