"""Pure-PyTorch references of the fused ops: the definition the kernels are tested against,
and the fallback when the compiled extension is missing. Same signatures as the fused ops."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _math_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _with_cross_entropy(rows, s, labels, ce_weight, ignore_index):
    """rows + ce_weight * CE(s, labels), 0 for the ignored rows; and which rows count."""
    counted = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    if labels is None:
        return rows, counted
    lab = labels.reshape(-1).long()
    counted = lab != ignore_index
    if ce_weight != 0:
        rows = rows + ce_weight * F.cross_entropy(s, lab, ignore_index=ignore_index, reduction="none")
    return torch.where(counted, rows, torch.zeros((), dtype=rows.dtype, device=s.device)), counted


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
    rows, counted = _with_cross_entropy(rows, s, labels, ce_weight, ignore_index)
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


def _sparse_distill_rows(s: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor, tail: str,
                         temperature: float) -> torch.Tensor:
    """Per-row KL of a sparse (top-k) teacher against the student logits s (N, V), before kd_weight * T^2."""
    dt = s.dtype
    zero = torch.zeros((), dtype=dt, device=s.device)
    V, k = s.shape[-1], indices.shape[-1]
    idx = indices.reshape(-1, k).long()
    lp = logprobs.reshape(-1, k).to(dt).detach()
    sorted_idx = idx.sort(-1).values
    if ((idx < 0) | (idx >= V)).any():
        raise ValueError(f"SparseTeacher.indices must be in [0, {V})")
    if k > 1 and (sorted_idx[:, 1:] == sorted_idx[:, :-1]).any():
        raise ValueError("SparseTeacher.indices repeat an id in a row (each kept id may appear once)")
    log_q = F.log_softmax(s / temperature, dim=-1)
    kept = log_q.gather(-1, idx)
    mass = lp.exp().sum(-1, keepdim=True)  # P: the kept teacher mass
    if tail == "bucket":
        log_p = lp - torch.where(mass > 1, mass.log(), zero)  # renormalised to 1 only when P > 1
        p = log_p.exp()
        rows = torch.where((p > 0) | p.isnan(), p * (log_p - kept), zero).sum(-1)
        if k < V:  # the tail outcome: teacher mass r = 1 - P, student mass q_r = sum of q off the kept ids
            r = (1 - mass.clamp(max=1)).clamp(min=0)
            mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
            log_q_r = torch.logsumexp(log_q.masked_fill(mask, -torch.inf), -1, keepdim=True)
            rows = rows + (torch.xlogy(r, r) - torch.where(r > 0, r * log_q_r, zero)).squeeze(-1)
        return rows
    # renormalize: teacher p_i / P and student q_i / sum_S q, over the kept ids only
    log_p = lp - mass.log()
    p = log_p.exp()
    log_qt = kept - torch.logsumexp(kept, -1, keepdim=True)
    rows = torch.where((p > 0) | p.isnan(), p * (log_p - log_qt), zero).sum(-1)
    return torch.where((mass > 0).squeeze(-1) | mass.isnan().squeeze(-1), rows, zero)  # no mass: nothing to teach


def fused_linear_distill_loss_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    chunk_size: int | None = None,  # noqa: ARG001  (the reference materialises every row at once)
) -> torch.Tensor:
    """``distill_kl_loss`` on materialised logits ``student_hidden @ student_weight.T (+ bias)``.

    ``teacher`` is a dense ``(hidden, weight[, bias])`` tuple or a ``SparseTeacher`` (indices,
    logprobs, tail) as defined in docs/ops.md; the teacher gets no gradient."""
    dense = not hasattr(teacher, "tail")
    xs = [student_hidden, student_weight] + ([t for t in teacher if t is not None] if dense else [])
    dt = _math_dtype(*xs)
    out_dtype = student_hidden.dtype
    lead = student_hidden.shape[:-1]
    s = F.linear(student_hidden.to(dt), student_weight.to(dt), None if student_bias is None else student_bias.to(dt))
    V = s.shape[-1]
    s = s.reshape(-1, V)
    T = float(temperature)
    if dense:
        th, tw = teacher[0], teacher[1]
        tb = teacher[2] if len(teacher) > 2 else None
        with torch.no_grad():
            t = F.linear(th.to(dt), tw.to(dt), None if tb is None else tb.to(dt)).reshape(-1, V)
        loss = distill_kl_loss_reference(
            s, t, None if labels is None else labels.reshape(-1), temperature=T, kd_weight=kd_weight,
            ce_weight=ce_weight, ignore_index=ignore_index, reduction=reduction,
        )
        return (loss.reshape(lead) if reduction == "none" else loss).to(out_dtype)
    rows = torch.zeros(s.shape[0], dtype=dt, device=s.device)
    if kd_weight != 0:
        rows = rows + kd_weight * T * T * _sparse_distill_rows(s, teacher.indices, teacher.logprobs, teacher.tail, T)
    rows, counted = _with_cross_entropy(rows, s, labels, ce_weight, ignore_index)
    if reduction == "none":
        return rows.reshape(lead).to(out_dtype)
    total = rows.sum()
    if reduction in ("mean", "batchmean"):
        total = total / counted.sum().clamp(min=1)
    return total.to(out_dtype)
