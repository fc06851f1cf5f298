"""Fused distillation loss: KL(teacher || student) at a temperature, plus optional hard-label
cross entropy, with the gradient computed in the same pass (csrc/distill_kl/)."""
from __future__ import annotations

import torch

from . import _ext, _validate
from .reference import distill_kl_loss_reference

_REDUCTIONS = {"none": 0, "sum": 1, "mean": 2, "batchmean": 2}


def distill_kl_loss(
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
    """Knowledge-distillation loss over the last dimension of the logits.

    Every leading index of ``student_logits`` (shape ``(..., V)``) is a row with loss
    ``kd_weight * T**2 * KL(softmax(t/T) || softmax(s/T)) + ce_weight * CE(s, label)``, the cross
    entropy taken on the untempered student logits. Rows whose label equals ``ignore_index`` count
    for neither term; ``labels`` may be given with ``ce_weight=0`` only to mask rows.

    reduction: "batchmean"/"mean" (sum over counted rows / their number; 0 when none count),
    "sum", or "none" (per-row values, shape ``(...)``, 0 for ignored rows).

    The loss has the student's dtype and each gradient its input's dtype. The gradient is
    computed in the forward pass, only for inputs that require grad (the teacher too, for mutual
    learning); ``backward`` hands it out scaled by the incoming gradient. Teacher logits may be
    -inf (masked vocabulary); a student -inf where the teacher has mass gives +inf for that row
    (and a teacher gradient of 0 for it).
    """
    _validate.float_tensor("student_logits", student_logits)
    _validate.float_tensor("teacher_logits", teacher_logits)
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (..., V)")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[-1] == 0:
        raise ValueError("the class dimension V of the logits must be > 0")
    _validate.same_device("teacher_logits", teacher_logits, "student_logits", student_logits)
    T = _validate.positive_finite("temperature", temperature)
    kd = _validate.finite_nonneg("kd_weight", kd_weight)
    ce = _validate.finite_nonneg("ce_weight", ce_weight)
    _validate.choice("reduction", reduction, tuple(_REDUCTIONS))
    ignore_index = _validate.int64("ignore_index", ignore_index)
    if labels is not None:
        _validate.integer_labels("labels", labels)
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"labels must have the leading shape of the logits {tuple(student_logits.shape[:-1])}, "
                f"got {tuple(labels.shape)}"
            )
        _validate.same_device("labels", labels, "student_logits", student_logits)
    elif ce > 0:
        raise ValueError("ce_weight > 0 needs labels")

    if not _ext.use_kernel("distill_kl", student_logits.device):
        return distill_kl_loss_reference(
            student_logits, teacher_logits, labels, temperature=T, kd_weight=kd, ce_weight=ce,
            ignore_index=ignore_index, reduction=reduction,
        )
    grad_on = torch.is_grad_enabled()
    loss, _, _ = torch.ops.reuse_core.distill_kl(
        student_logits, teacher_logits, labels, T, kd, ce, ignore_index, _REDUCTIONS[reduction],
        grad_on and student_logits.requires_grad, grad_on and teacher_logits.requires_grad,
    )
    return loss


if _ext.available():

    @torch.library.register_fake("reuse_core::distill_kl")
    def _distill_kl_fake(student, teacher, labels, temperature, kd_weight, ce_weight, ignore_index,
                         reduction, grad_student, grad_teacher):
        loss = student.new_empty(student.shape[:-1] if reduction == 0 else ())
        gs = student.new_empty(student.shape if grad_student else (0,))
        gt = teacher.new_empty(teacher.shape if grad_teacher else (0,))
        return loss, gs, gt

    def _setup_context(ctx, inputs, output):
        _, gs, gt = output
        ctx.save_for_backward(gs, gt)
        ctx.per_row = inputs[7] == 0
        ctx.mark_non_differentiable(gs, gt)
        # Otherwise autograd fills a zero "gradient" for gs and gt: two logits-sized memsets.
        ctx.set_materialize_grads(False)

    def _scaled(saved: torch.Tensor, grad_loss: torch.Tensor, per_row: bool) -> torch.Tensor:
        if per_row:
            return saved * grad_loss.unsqueeze(-1).to(saved.dtype)
        # loss.backward() passes 1: hand out the saved gradient itself. Autograd never writes
        # into it (it clones before accumulating while we still hold it, e.g. retain_graph).
        # Only for a real tensor in eager mode: a traced one (torch.compile, opcheck) has no
        # value to branch on. On CUDA the test costs one small device-to-host sync, far less
        # than a logits-sized copy.
        if type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling() and bool(grad_loss == 1):
            return saved
        return saved * grad_loss.to(saved.dtype)

    def _backward(ctx, grad_loss, _grad_gs, _grad_gt):
        gs, gt = ctx.saved_tensors
        if grad_loss is None:  # the loss took no part in what is differentiated
            return (None,) * 10
        d_student = _scaled(gs, grad_loss, ctx.per_row) if ctx.needs_input_grad[0] else None
        d_teacher = _scaled(gt, grad_loss, ctx.per_row) if ctx.needs_input_grad[1] else None
        return d_student, d_teacher, None, None, None, None, None, None, None, None

    torch.library.register_autograd("reuse_core::distill_kl", _backward, setup_context=_setup_context)
