"""Fused scaled dot-product attention, flash-style on both backends (csrc/attention/): tiles and
an online softmax, only the output and each row's softmax statistics kept for the backward, which
recomputes the scores tile by tile. Memory grows with the sequence length, not its square."""
from __future__ import annotations

import math
import warnings

import torch

from . import _ext, _validate
from .reference import attention_reference

_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}


def _check(q, k, v, key_padding_mask, scale) -> float:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _validate.float_tensor(name, x)
        if x.dim() != 4:
            layout = "(B, H, Lq, D)" if name == "q" else "(B, Hkv, Lk, D)"
            raise ValueError(f"{name} must be 4-D {layout}, got {x.dim()}-D with shape {tuple(x.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    B, H, _, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k and v have batch size {k.shape[0]} but q has {B}")
    if k.shape[3] != D:
        raise ValueError(f"k and v have head dim {k.shape[3]} but q has {D}; they must match")
    if D == 0:
        raise ValueError("the head dim D must be > 0")
    if k.shape[1] == 0 or H % k.shape[1] != 0:
        raise ValueError(f"the query heads H={H} must be a multiple of the key/value heads Hkv={k.shape[1]}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _validate.same_device("k", k, "q", q)
    _validate.same_device("v", v, "q", q)
    allowed = _DTYPES.get(q.device.type)
    if allowed is not None and q.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"attention on {q.device.type} takes {names}; got {q.dtype}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = ignore that key), got "
                            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        if key_padding_mask.shape != (B, k.shape[2]):
            raise ValueError(f"key_padding_mask must have shape (B, Lk) = {(B, k.shape[2])}, "
                             f"got {tuple(key_padding_mask.shape)}")
        _validate.same_device("key_padding_mask", key_padding_mask, "q", q)
    if scale is None:
        return 1.0 / math.sqrt(D)
    s = _validate.number("scale", scale)
    if not math.isfinite(s):
        raise ValueError(f"scale must be finite, got {scale}")
    return s


def _padding_of(attn_mask: torch.Tensor, B: int, Lk: int) -> torch.Tensor | None:
    """The (B, Lk) key-padding mask (True = ignore) that a bool SDPA mask broadcast over heads and
    queries stands for, or None for any other mask (the kernel cannot run those)."""
    if attn_mask.dtype != torch.bool or attn_mask.dim() > 4 or attn_mask.shape[-1:] != (Lk,):
        return None
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if m.shape[1] != 1 or m.shape[2] != 1 or m.shape[0] not in (1, B):
        return None
    return ~m[:, 0, 0, :].expand(B, Lk)


def _through_sdpa(q, k, v, attn_mask, dropout_p, causal, scale, key_padding_mask, why: str) -> torch.Tensor:
    warnings.warn(f"reuse_core.ops.attention: {why}, which the fused kernel does not run; this call runs "
                  "torch.nn.functional.scaled_dot_product_attention instead", RuntimeWarning, stacklevel=3)
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]
        if attn_mask is None or attn_mask.dtype == torch.bool:
            attn_mask = keep if attn_mask is None else attn_mask & keep
        else:
            attn_mask = attn_mask.masked_fill(~keep, float("-inf"))
    if causal and attn_mask is not None:  # SDPA takes one or the other: fold the causal mask in
        Lq, Lk = q.shape[-2], k.shape[-2]
        future = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).triu(1)
        attn_mask = attn_mask & ~future if attn_mask.dtype == torch.bool else attn_mask.masked_fill(future, float("-inf"))
        causal = False
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1])


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = True,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(scale * q @ k^T + masks) @ v`` per head, as ``F.scaled_dot_product_attention``,
    with its argument names and order: code written for SDPA ports by renaming the function.

    q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D) with H a multiple of Hkv (grouped-query attention:
    query head h reads key/value head h // (H // Hkv), as SDPA's ``enable_gqa``, which is accepted
    and always on). Lq may differ from Lk. ``is_causal`` (or its alias ``causal``) masks key j for
    query i when j > i (top-left alignment, as SDPA). ``scale`` defaults to 1/sqrt(D).
    ``key_padding_mask``: (B, Lk) bool, True = ignore that key (``nn.MultiheadAttention``'s convention).
    ``attn_mask`` follows SDPA: bool with True = attend, or a float mask added to the scores.

    The fused kernel runs key padding and causal masks, including a bool ``attn_mask`` broadcast
    over heads and queries ((B, 1, 1, Lk), (1, Lk), ...). Any other ``attn_mask``, and
    ``dropout_p > 0``, run through SDPA, with a warning that says why.

    Returns (B, H, Lq, D) in the input dtype. A query whose keys are all masked gets a zero
    output and zero gradients on the kernel (SDPA gives NaN). dtypes: float32, float64, bfloat16 on
    the CPU; float32, float16, bfloat16 on CUDA; the math runs in float32 (float64 for float64).
    """
    s = _check(q, k, v, key_padding_mask, scale)
    causal = bool(causal or is_causal)
    dropout_p = _validate.number("dropout_p", dropout_p)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a tensor (bool: True = attend; or float, added), got "
                            f"{type(attn_mask).__name__}")
        _validate.same_device("attn_mask", attn_mask, "q", q)
        padding = _padding_of(attn_mask, q.shape[0], k.shape[2])
        if padding is None:
            return _through_sdpa(q, k, v, attn_mask, dropout_p, causal, s, key_padding_mask,
                                 f"an attn_mask of dtype {attn_mask.dtype} and shape {tuple(attn_mask.shape)} is not a "
                                 "key-padding mask")
        key_padding_mask = padding if key_padding_mask is None else key_padding_mask | padding
    if dropout_p > 0:
        return _through_sdpa(q, k, v, None, dropout_p, causal, s, key_padding_mask, f"dropout_p={dropout_p}")
    if not _ext.use_kernel("attention", q.device):
        return attention_reference(q, k, v, causal=causal, scale=s, key_padding_mask=key_padding_mask)
    out, _ = torch.ops.reuse_core.attention(q, k, v, key_padding_mask, causal, s)
    return out


if _ext.available():

    @torch.library.register_fake("reuse_core::attention")
    def _attention_fake(q, k, v, key_padding_mask, causal, scale):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_empty(q.shape), q.new_empty((2,) + tuple(q.shape[:3]), dtype=acc)

    @torch.library.register_fake("reuse_core::attention_backward")
    def _attention_backward_fake(grad, q, k, v, key_padding_mask, out, stats, causal, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _setup_context(ctx, inputs, output):
        q, k, v, key_padding_mask, causal, scale = inputs
        out, stats = output
        ctx.save_for_backward(q, k, v, key_padding_mask, out, stats)
        ctx.causal, ctx.scale = causal, scale
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)

    def _backward(ctx, grad_out, _grad_stats):
        q, k, v, key_padding_mask, out, stats = ctx.saved_tensors
        if grad_out is None:  # the output took no part in the loss
            return None, None, None, None, None, None
        dq, dk, dv = torch.ops.reuse_core.attention_backward(
            grad_out, q, k, v, key_padding_mask, out, stats, ctx.causal, ctx.scale
        )
        need = ctx.needs_input_grad
        return dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None, None

    torch.library.register_autograd("reuse_core::attention", _backward, setup_context=_setup_context)
