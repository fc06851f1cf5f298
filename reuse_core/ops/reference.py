"""Pure-PyTorch references of the fused ops: the definition the kernels are tested against,
and the fallback when the compiled extension is missing. Same signatures as the fused ops."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _math_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def distill_kl_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T)) + ce_weight * CE(s, label), per row."""
    dt = _math_dtype(student_logits, teacher_logits)
    V = student_logits.shape[-1]
    s = student_logits.to(dt).reshape(-1, V)
    t = teacher_logits.to(dt).reshape(-1, V)
    T = float(temperature)
    log_q = F.log_softmax(s / T, dim=-1)
    log_p = F.log_softmax(t / T, dim=-1)
    p = log_p.exp()
    # Terms with p = 0 contribute 0 (and their gradient is 0, not 0 * inf); a NaN p stays in, so a
    # NaN anywhere in a row reaches its loss and both of its gradients.
    diff = torch.where((p > 0) | p.isnan(), log_p - log_q, torch.zeros((), dtype=dt, device=s.device))
    rows = torch.zeros(s.shape[0], dtype=dt, device=s.device)
    if kd_weight != 0:
        rows = rows + kd_weight * T * T * (p * diff).sum(-1)
    counted = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    if labels is not None:
        lab = labels.reshape(-1).long()
        counted = lab != ignore_index
        if ce_weight != 0:
            rows = rows + ce_weight * F.cross_entropy(s, lab, ignore_index=ignore_index, reduction="none")
        rows = torch.where(counted, rows, torch.zeros((), dtype=dt, device=s.device))
    out_dtype = student_logits.dtype
    if reduction == "none":
        return rows.reshape(student_logits.shape[:-1]).to(out_dtype)
    total = rows.sum()
    if reduction in ("mean", "batchmean"):
        total = total / counted.sum().clamp(min=1)
    return total.to(out_dtype)


def ensemble_average_reference(
    member_logits: torch.Tensor | Sequence[torch.Tensor],
    weights: torch.Tensor | None = None,
    *,
    mode: str = "probs",
) -> torch.Tensor:
    """sum_k w_k f(z_k) / sum_k w_k with f = identity ("logits") or softmax ("probs");
    "log_probs" is the log of the "probs" result, computed as a logsumexp. A member row of all
    -inf has the uniform softmax (the limit of a constant row). A NaN is never masked, not even
    by a zero weight (0 * NaN = NaN)."""
    z = member_logits if isinstance(member_logits, torch.Tensor) else torch.stack(list(member_logits))
    K = z.shape[0]
    out_dtype = z.dtype
    dt = _math_dtype(z) if weights is None else _math_dtype(z, weights)
    zf = z.to(dt)
    w = torch.ones(K, dtype=dt, device=z.device) if weights is None else weights.to(dt)
    wn = (w / w.sum()).reshape((K,) + (1,) * (z.dim() - 1))
    zero = torch.zeros((), dtype=dt, device=z.device)
    if mode != "logits":  # softmax is shift-invariant: a row of -inf is a constant row
        zf = torch.where((zf == -torch.inf).all(-1, keepdim=True), zero, zf)
    if mode == "logits":
        # A zero-weight member's -inf logits must not turn 0 * -inf into NaN; its finite logits
        # stay, so the weight still gets its gradient <g, z_k - y> / sum(w).
        out = (wn * torch.where((wn == 0) & torch.isinf(zf), zero, zf)).sum(0)
    elif mode == "probs":
        out = (wn * F.softmax(zf, dim=-1)).sum(0)
    elif mode == "log_probs":
        # log sum_k wn_k p_k, shifted by the largest log p_k of a positively weighted member
        # (a constant for autograd) so nothing underflows, and without log(wn), whose gradient
        # at wn = 0 would be inf * 0.
        lp = F.log_softmax(zf, dim=-1)
        m = torch.where(wn > 0, lp, -torch.inf).amax(0).detach()
        m = torch.where(torch.isfinite(m), m, zero)
        out = m + torch.log((wn * torch.exp(lp - m)).sum(0))
    else:
        raise ValueError(f"mode must be 'logits', 'probs' or 'log_probs', got {mode!r}")
    return out.to(out_dtype)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scale * Q K^T + masks) V with the full (Lq, Lk) score matrix per head (the eager
    math). q (B, H, Lq, D), k and v (B, Hkv, Lk, D), query head h reads key/value head
    h // (H // Hkv); causal masks key j for query i when j > i; key_padding_mask (B, Lk), True =
    ignore. A query whose keys are all masked gets zeros (and zero gradients).

    A masked key reaches nothing: not its k through the score, nor its v through a probability
    of 0 (where 0 * NaN would be NaN), in the output or the gradients. A NaN anywhere else
    reaches every output and gradient that depends on it."""
    dt = _math_dtype(q, k, v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    group = H // k.shape[1]
    qf = q.to(dt)
    kf = k.to(dt).repeat_interleave(group, dim=1)
    vf = v.to(dt).repeat_interleave(group, dim=1)
    masked = torch.zeros((Lq, Lk), dtype=torch.bool, device=q.device)
    if causal:
        masked = torch.ones((Lq, Lk), dtype=torch.bool, device=q.device).triu(1)
    masked = masked.expand(B, 1, Lq, Lk)
    if key_padding_mask is not None:
        masked = masked | key_padding_mask.to(torch.bool)[:, None, None, :]
    # With a NaN or inf input, each product sums only the pairs that are not masked: the
    # operands are masked before they multiply, so autograd never forms 0 * NaN either.
    exact = not all(bool(torch.isfinite(x).all()) for x in (q, k, v))
    zero = torch.zeros((), dtype=dt, device=q.device)
    keep = ~masked[..., None]

    def product(a, b):  # sum_d a[..., i, :] b[..., j, :] over the kept (i, j)
        if not exact:
            return torch.matmul(a, b.transpose(-2, -1))
        return (torch.where(keep, a[..., :, None, :], zero) * torch.where(keep, b[..., None, :, :], zero)).sum(-1)

    s = product(qf, kf) * (D**-0.5 if scale is None else float(scale))
    # Rows with every key masked: softmax over finite zeros, then zeroed, so no NaN reaches
    # either the output or the gradients.
    empty = masked.all(-1, keepdim=True)
    s = torch.where(masked & ~empty, -torch.inf, torch.where(masked, zero, s))
    p = torch.where(masked, zero, torch.softmax(s, dim=-1))
    if not exact:
        return torch.matmul(p, vf).to(q.dtype)
    return (torch.where(keep, p[..., None], zero) * torch.where(keep, vf[..., None, :, :], zero)).sum(-2).to(q.dtype)
