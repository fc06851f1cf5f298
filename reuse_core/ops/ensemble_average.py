"""Fused ensemble averaging: the weighted mean of K members' logits, probabilities or
log-probabilities, with gradients to every member and to the weights (csrc/ensemble_average/)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _ext, _validate
from .reference import ensemble_average_reference

_MODES = {"logits": 0, "probs": 1, "log_probs": 2}


def ensemble_average(
    member_logits: torch.Tensor | Sequence[torch.Tensor],
    weights: torch.Tensor | None = None,
    *,
    mode: str = "probs",
) -> torch.Tensor:
    """Combine K members' outputs: ``y = sum_k w_k f(z_k) / sum_k w_k``.

    member_logits: a tensor ``(K, ..., C)`` or a sequence of K tensors ``(..., C)`` (not
    stacked: no copy is made). weights: ``(K,)``, non-negative with a positive sum,
    differentiable; ``None`` means uniform. mode: "logits" (f = identity), "probs"
    (f = softmax over C) or "log_probs" (log of the "probs" result, computed stably, for NLL
    training). Output ``(..., C)`` in the members' dtype; the weights' gradient has the weights'
    dtype. A zero weight removes its member from the output but still gets its true gradient.

    On CUDA, a negative weight or a zero weight sum is caught by a device-side assert (checking
    it on the host would synchronise); on the CPU it raises ValueError.
    """
    _validate.choice("mode", mode, tuple(_MODES))
    if isinstance(member_logits, torch.Tensor):
        _validate.float_tensor("member_logits", member_logits)
        if member_logits.dim() < 2:
            raise ValueError(f"member_logits as one tensor must be (K, ..., C), got shape {tuple(member_logits.shape)}")
        members, stacked, K = [member_logits], True, member_logits.shape[0]
        first = member_logits
    else:
        members = list(member_logits)
        if not members:
            raise ValueError("member_logits must hold at least one member")
        for i, m in enumerate(members):
            _validate.float_tensor(f"member_logits[{i}]", m)
        first, stacked, K = members[0], False, len(members)
        if first.dim() < 1:
            raise ValueError("each member must be (..., C), got a 0-d tensor")
        for i, m in enumerate(members[1:], 1):
            if m.shape != first.shape:
                raise ValueError(f"member_logits[{i}] has shape {tuple(m.shape)} but member 0 has {tuple(first.shape)}")
            if m.dtype != first.dtype:
                raise TypeError(f"member_logits[{i}] is {m.dtype} but member 0 is {first.dtype}")
            _validate.same_device(f"member_logits[{i}]", m, "member_logits[0]", first)
    if K == 0:
        raise ValueError("member_logits must hold at least one member (K >= 1)")
    if first.shape[-1] == 0:
        raise ValueError("the class dimension C of the members must be > 0")
    if weights is None:
        wdtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        weights = torch.ones(K, dtype=wdtype, device=first.device)
    else:
        _validate.float_tensor("weights", weights)
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape ({K},), one per member, got {tuple(weights.shape)}")
        _validate.same_device("weights", weights, "member_logits", first)
        # On CUDA this would synchronise (a device assert checks instead); under torch.compile
        # it would break the graph (the kernel checks instead).
        if weights.device.type == "cpu" and not torch.compiler.is_compiling():
            if bool((weights < 0).any()) or bool(torch.isnan(weights).any()):
                raise ValueError(f"weights must be non-negative, got {weights.tolist()}")
            if not bool(weights.sum() > 0):
                raise ValueError("weights must have a positive sum, got a sum of 0")

    if not _ext.use_kernel("ensemble_average", first.device):
        return ensemble_average_reference(member_logits, weights, mode=mode)
    out, _ = torch.ops.reuse_core.ensemble_average(members, weights, _MODES[mode], stacked)
    return out


if _ext.available():

    @torch.library.register_fake("reuse_core::ensemble_average")
    def _ensemble_average_fake(members, weights, mode, stacked):
        shape = members[0].shape[1:] if stacked else members[0].shape
        K = weights.shape[0]
        rows = 1
        for d in shape[:-1]:
            rows *= d
        acc = torch.float64 if members[0].dtype == torch.float64 else torch.float32
        return members[0].new_empty(shape), members[0].new_empty((2, K, rows), dtype=acc)

    @torch.library.register_fake("reuse_core::ensemble_average_backward")
    def _ensemble_average_backward_fake(grad, members, weights, out, lse, mode, stacked):
        return [m.new_empty(m.shape) for m in members], weights.new_empty(weights.shape)

    def _setup_context(ctx, inputs, output):
        members, weights, mode, stacked = inputs
        out, lse = output
        ctx.save_for_backward(weights, out, lse, *members)
        ctx.mode, ctx.stacked = mode, stacked
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)

    def _backward(ctx, grad_out, _grad_lse):
        weights, out, lse, *members = ctx.saved_tensors
        if grad_out is None:  # the output took no part in the loss
            return [None] * len(members), None, None, None
        d_members, d_weights = torch.ops.reuse_core.ensemble_average_backward(
            grad_out.contiguous(), members, weights, out, lse, ctx.mode, ctx.stacked
        )
        return list(d_members), d_weights, None, None

    torch.library.register_autograd("reuse_core::ensemble_average", _backward, setup_context=_setup_context)
