"""Fused linear + distillation loss: the student's logits ``hidden @ weight.T (+ bias)`` are made
chunk by chunk of rows and never exist in full, with a dense teacher (its hidden states and
head) or a sparse top-k one (:class:`SparseTeacher`) (csrc/fused_linear_distill/)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import _ext, _validate
from .reference import fused_linear_distill_loss_reference

_REDUCTIONS = {"none": 0, "sum": 1, "mean": 2, "batchmean": 2}
_TAILS = {"bucket": 1, "renormalize": 2}
_DENSE = 0


class SparseTeacher(NamedTuple):
    """A teacher given by its top-k log-probabilities per row (docs/ops.md defines the loss).

    ``indices`` (..., k) integer ids in [0, V), no id twice in a row; ``logprobs`` (..., k) the
    teacher's log-probabilities of those ids at the distillation temperature, over the full
    vocabulary (``temperature`` applies to the student only). ``tail``: ``"bucket"`` (the mass
    off the kept ids, 1 - P, is one more outcome, compared with the student's mass off them) or
    ``"renormalize"`` (both distributions restricted to the kept ids and renormalised)."""

    indices: torch.Tensor
    logprobs: torch.Tensor
    tail: str = "bucket"


def _leading(name: str, x: torch.Tensor, lead: torch.Size, what: str) -> None:
    if x.dim() < 1 or x.shape[:-1] != lead:
        raise ValueError(f"{name} must have the leading shape {tuple(lead)} of student_hidden, {what}; "
                         f"got {tuple(x.shape)}")


def fused_linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: tuple | SparseTeacher,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``distill_kl_loss`` on the logits of a linear head, without materialising them.

    The student logits are ``student_hidden (..., Hs) @ student_weight (V, Hs).T (+ student_bias
    (V,))``. ``teacher`` is a dense tuple ``(teacher_hidden (..., Ht), teacher_weight (V, Ht)[,
    teacher_bias (V,)])`` or a :class:`SparseTeacher`. The loss per row is
    ``kd_weight * T**2 * KL(teacher_T || student_T) + ce_weight * CE(student, label)`` with the
    reductions and ``ignore_index`` of :func:`~reuse_core.ops.distill_kl_loss` ("batchmean" and
    "mean" divide by the rows not ignored, over all leading dimensions).

    Rows are processed ``chunk_size`` at a time. ``None`` picks it from memory: the per-chunk
    logits buffers (student, teacher and gradient for a dense teacher; student and gradient for
    a sparse one; float32, float64 for float64 inputs) take at most 64 MiB, rounded down to a
    multiple of 8 rows and clamped to [8, 1024]. The gradients of ``student_hidden``,
    ``student_weight`` and ``student_bias`` are computed in the forward pass (for
    reduction="none" in the backward, by a second pass, since the per-row weights are only known
    there). The teacher's tensors are constants: they get no gradient, whatever their
    ``requires_grad``. bfloat16/float16 inputs are computed in float32 (a float32 copy of the
    weights is made); the loss has the student's dtype, each gradient its input's dtype.
    """
    _validate.float_tensor("student_hidden", student_hidden)
    _validate.float_tensor("student_weight", student_weight)
    if student_hidden.dim() < 1:
        raise ValueError("student_hidden must have at least one dimension (..., H)")
    H = student_hidden.shape[-1]
    if student_weight.dim() != 2 or student_weight.shape[1] != H:
        raise ValueError(f"student_weight must be (V, H) with H = {H} (student_hidden's last dimension), "
                         f"got {tuple(student_weight.shape)}")
    V = student_weight.shape[0]
    if V == 0:
        raise ValueError("student_weight must have V > 0 rows (the vocabulary)")
    dev = student_hidden.device
    _validate.same_device("student_weight", student_weight, "student_hidden", student_hidden)
    lead = student_hidden.shape[:-1]
    if student_bias is not None:
        _validate.float_tensor("student_bias", student_bias)
        if student_bias.shape != (V,):
            raise ValueError(f"student_bias must have shape ({V},), got {tuple(student_bias.shape)}")
        _validate.same_device("student_bias", student_bias, "student_hidden", student_hidden)

    th = tw = tb = ix = lp = None
    if isinstance(teacher, SparseTeacher):
        mode = _TAILS.get(teacher.tail)
        if mode is None:
            raise ValueError(f"SparseTeacher.tail must be one of 'bucket', 'renormalize', got {teacher.tail!r}")
        ix, lp = teacher.indices, teacher.logprobs
        _validate.integer_labels("SparseTeacher.indices", ix)
        _validate.float_tensor("SparseTeacher.logprobs", lp)
        _leading("SparseTeacher.indices", ix, lead, "then k")
        if lp.shape != ix.shape:
            raise ValueError(f"SparseTeacher.logprobs must have the shape of SparseTeacher.indices {tuple(ix.shape)}, "
                             f"got {tuple(lp.shape)}")
        if not 1 <= ix.shape[-1] <= V:
            raise ValueError(f"SparseTeacher.indices must keep k in [1, V={V}] ids per row, got k = {ix.shape[-1]}")
        _validate.same_device("SparseTeacher.indices", ix, "student_hidden", student_hidden)
        _validate.same_device("SparseTeacher.logprobs", lp, "student_hidden", student_hidden)
        ix, lp = ix.detach(), lp.detach()
    elif isinstance(teacher, (tuple, list)) and len(teacher) in (2, 3):
        mode = _DENSE
        th, tw = teacher[0], teacher[1]
        tb = teacher[2] if len(teacher) == 3 else None
        _validate.float_tensor("teacher[0] (teacher_hidden)", th)
        _validate.float_tensor("teacher[1] (teacher_weight)", tw)
        _leading("teacher[0] (teacher_hidden)", th, lead, "then Ht")
        if tw.dim() != 2 or tw.shape != (V, th.shape[-1]):
            raise ValueError(f"teacher[1] (teacher_weight) must be (V, Ht) = ({V}, {th.shape[-1]}), "
                             f"got {tuple(tw.shape)}")
        _validate.same_device("teacher[0] (teacher_hidden)", th, "student_hidden", student_hidden)
        _validate.same_device("teacher[1] (teacher_weight)", tw, "student_hidden", student_hidden)
        if tb is not None:
            _validate.float_tensor("teacher[2] (teacher_bias)", tb)
            if tb.shape != (V,):
                raise ValueError(f"teacher[2] (teacher_bias) must have shape ({V},), got {tuple(tb.shape)}")
            _validate.same_device("teacher[2] (teacher_bias)", tb, "student_hidden", student_hidden)
            tb = tb.detach()
        th, tw = th.detach(), tw.detach()
    else:
        raise TypeError("teacher must be a (teacher_hidden, teacher_weight[, teacher_bias]) tuple or a "
                        f"reuse_core.ops.SparseTeacher, got {type(teacher).__name__}")

    T = _validate.positive_finite("temperature", temperature)
    kd = _validate.finite_nonneg("kd_weight", kd_weight)
    ce = _validate.finite_nonneg("ce_weight", ce_weight)
    _validate.choice("reduction", reduction, tuple(_REDUCTIONS))
    ignore_index = _validate.int64("ignore_index", ignore_index)
    if chunk_size is None:
        chunk = 0
    else:
        chunk = _validate.int64("chunk_size", chunk_size)
        if chunk <= 0:
            raise ValueError(f"chunk_size must be a positive number of rows or None, got {chunk}")
    if labels is not None:
        _validate.integer_labels("labels", labels)
        if labels.shape != lead:
            raise ValueError(f"labels must have the leading shape {tuple(lead)} of student_hidden, "
                             f"got {tuple(labels.shape)}")
        _validate.same_device("labels", labels, "student_hidden", student_hidden)
    elif ce > 0:
        raise ValueError("ce_weight > 0 needs labels")

    if not _ext.use_kernel("fused_linear_distill", dev):
        return fused_linear_distill_loss_reference(
            student_hidden, student_weight, teacher if mode != _DENSE else (th, tw, tb), labels,
            student_bias=student_bias, temperature=T, kd_weight=kd, ce_weight=ce, ignore_index=ignore_index,
            reduction=reduction, chunk_size=chunk_size,
        )
    grad_on = torch.is_grad_enabled()
    # reduction "none": the gradients need the per-row upstream gradient, so the backward computes them
    in_fwd = grad_on and reduction != "none"
    loss, _, _, _ = torch.ops.reuse_core.fused_linear_distill(
        student_hidden, student_weight, student_bias, th, tw, tb, ix, lp, mode, labels, None, T, kd, ce,
        ignore_index, _REDUCTIONS[reduction], chunk,
        in_fwd and student_hidden.requires_grad, in_fwd and student_weight.requires_grad,
        in_fwd and student_bias is not None and student_bias.requires_grad,
    )
    return loss


if _ext.available():

    @torch.library.register_fake("reuse_core::fused_linear_distill")
    def _fused_linear_distill_fake(hidden, weight, bias, th, tw, tb, ix, lp, mode, labels, row_weight, temperature,
                                   kd_weight, ce_weight, ignore_index, reduction, chunk_size, grad_hidden,
                                   grad_weight, grad_bias):
        loss = hidden.new_empty(hidden.shape[:-1] if reduction == 0 else ())
        gh = hidden.new_empty(hidden.shape if grad_hidden else (0,))
        gw = weight.new_empty(weight.shape if grad_weight else (0,))
        gb = (bias.new_empty(bias.shape) if grad_bias and bias is not None else hidden.new_empty((0,)))
        return loss, gh, gw, gb

    _N_INPUTS = 20

    def _setup_context(ctx, inputs, output):
        _, gh, gw, gb = output
        ctx.per_row = inputs[15] == 0
        if ctx.per_row:  # recompute in the backward with the per-row gradient as row_weight
            ctx.save_for_backward(*(inputs[i] for i in (0, 1, 2, 3, 4, 5, 6, 7, 9)))
            ctx.args = (inputs[8],) + tuple(inputs[11:17])
        else:
            ctx.save_for_backward(gh, gw, gb)
        ctx.mark_non_differentiable(gh, gw, gb)
        ctx.set_materialize_grads(False)

    def _scaled(saved: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
        # loss.backward() passes 1: hand out the saved gradient itself (see distill_kl.py).
        if type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling() and bool(grad_loss == 1):
            return saved
        return saved * grad_loss.to(saved.dtype)

    def _backward(ctx, grad_loss, _g1, _g2, _g3):
        need = ctx.needs_input_grad
        out = [None] * _N_INPUTS
        if grad_loss is None:
            return tuple(out)
        if ctx.per_row:
            hidden, weight, bias, th, tw, tb, ix, lp, labels = ctx.saved_tensors
            mode, T, kd, ce, ignore_index, _reduction, chunk = ctx.args
            _, gh, gw, gb = torch.ops.reuse_core.fused_linear_distill(
                hidden, weight, bias, th, tw, tb, ix, lp, mode, labels, grad_loss, T, kd, ce, ignore_index,
                _REDUCTIONS["sum"], chunk, need[0], need[1], bool(need[2]) and bias is not None,
            )
        else:
            gh, gw, gb = ctx.saved_tensors
            gh, gw, gb = (_scaled(g, grad_loss) if n else None for g, n in zip((gh, gw, gb), need[:3]))
        out[0] = gh if need[0] else None
        out[1] = gw if need[1] else None
        out[2] = gb if need[2] else None
        return tuple(out)

    torch.library.register_autograd(
        "reuse_core::fused_linear_distill", _backward, setup_context=_setup_context,
    )
