"""Model merging on state dicts: linear, task arithmetic (Ilharco et al., 2023), TIES (Yadav et
al., 2023), DARE (Yu et al., 2024) and SLERP; and stacking the heads of models trained on
different classes into one head over the union of their classes.

The task-vector methods work on τᵢ = Aᵢ − B, for models Aᵢ fine-tuned from a base B, and return
B + λ·τ (λ = ``scale``):

- ``task-arithmetic``: τ = Σᵢ wᵢ τᵢ (w default 1 each).
- ``ties``: per tensor, keep each τᵢ's top ⌈density·n⌉ entries by magnitude and zero the rest;
  elect each entry's sign as the sign of Σᵢ wᵢ τ̂ᵢ (an entry whose sum is 0 stays 0); τ is the
  w-weighted mean of the kept values whose sign agrees with the elected one (with the default
  equal weights, their plain mean: the paper's disjoint mean).
- ``dare-linear`` / ``dare-ties``: drop each entry of each τᵢ with probability ``drop`` and rescale
  the rest by 1/(1 − drop); then combine as task arithmetic, or by TIES's sign election and
  disjoint mean without its trimming. The masks come from ``generator``: for each parameter in
  sorted order of the keys (not the dict's order, which a safetensors file does not keep), for
  each model in order, an entry is kept where ``torch.rand(shape, generator=generator) >= drop``;
  one seed gives one result.

``linear`` is the weighted mean of the models (w default equal; no base needed). ``slerp``
interpolates two models at ``t`` along the great circle through them, per tensor, and falls back
to linear interpolation when the two tensors are nearly parallel or anti-parallel
(|cos| > :data:`PARALLEL_COS`) or one is zero; it takes no base.

Each parameter tensor is merged on its own, in float64, and cast back to its dtype. Buffers take
no part in the merge: floating ones (batch-norm statistics) are the uniform mean of the models,
integer ones (batch-norm's step counter) come from the first model.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import torch

METHODS = ("linear", "task-arithmetic", "ties", "dare-linear", "dare-ties", "slerp")
TASK_VECTOR_METHODS = ("task-arithmetic", "ties", "dare-linear", "dare-ties")
DEFAULT_DENSITY = 0.2  # TIES keeps the top 20% of each task vector
DEFAULT_DROP = 0.9     # DARE's usual drop rate
DEFAULT_T = 0.5
PARALLEL_COS = 0.9995  # slerp's fallback to lerp, where sin(Ω) is too small to divide by
# The λ grid --select-scale searches: 0.1, 0.2, ..., 2.0 (task arithmetic's sweep of Ilharco et al.
# in steps of 0.1, continued past 1 for the disjoint means of TIES and DARE-TIES, which shrink τ).
SCALE_GRID = tuple(round(0.1 * i, 1) for i in range(1, 21))
_BN_STATISTICS = ("running_mean", "running_var")


class MergeError(ValueError):
    """The models cannot be merged: different architectures, a missing base, bad settings."""


def merge(base: Mapping[str, torch.Tensor] | None,
          models: Sequence[Mapping[str, torch.Tensor]] | Mapping[str, Mapping[str, torch.Tensor]],
          method: str, *, weights: Sequence[float] | None = None, scale: float = 1.0, density: float | None = None,
          drop: float | None = None, t: float | None = None, generator: torch.Generator | None = None,
          buffers: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """The merge of ``models`` (state dicts; a mapping name -> state dict names them in errors) by
    ``method`` (:data:`METHODS`), as the module docstring defines each; a new state dict.

    ``base``: the state dict the models were fine-tuned from (required by the task-vector methods,
    refused by slerp, unused by linear beyond the architecture check). ``density`` (ties, default
    0.2), ``drop`` (dare-*, default 0.9) and ``t`` (slerp, default 0.5) belong to their methods
    only. ``buffers``: the keys that are buffers (default: keys ending in ``running_mean`` or
    ``running_var``). Raises :class:`MergeError` naming the model that does not fit.
    """
    named = list(models.items()) if isinstance(models, Mapping) else [(f"model {i}", m) for i, m in enumerate(models)]
    density, drop, t, w = _settings(method, base, len(named), weights=weights, scale=scale, density=density,
                                    drop=drop, t=t)
    ref_name, ref = ("the base", base) if base is not None else named[0]
    for name, sd in named:
        check_architecture(ref, sd, name, ref_name)
    is_buffer = (lambda k: k in buffers) if buffers is not None else (lambda k: k.rsplit(".", 1)[-1] in _BN_STATISTICS)
    first = named[0][1]
    out = {}
    for key in sorted(ref):
        r = ref[key]
        if not r.is_floating_point():
            out[key] = first[key].clone()
            continue
        xs = [sd[key].detach().to("cpu", torch.float64) for _, sd in named]
        if is_buffer(key):
            merged = torch.stack(xs).mean(0)
        elif method == "slerp":
            merged = slerp(xs[0], xs[1], t)
        elif method == "linear":
            merged = sum(wi * x for wi, x in zip(w, xs)) / sum(w)
        else:
            b = r.detach().to("cpu", torch.float64)
            taus = [x - b for x in xs]
            if method.startswith("dare"):
                taus = [dare(tau, drop, generator) for tau in taus]
            if method == "ties":
                taus = [trim(tau, density) for tau in taus]
            tau = sum(wi * ti for wi, ti in zip(w, taus)) if method in ("task-arithmetic", "dare-linear") \
                else disjoint_mean(taus, w)
            merged = b + scale * tau
        out[key] = merged.to(r.dtype)
    return {k: out[k] for k in ref}


def _settings(method, base, count, *, weights, scale, density, drop, t):
    """(density, drop, t, weights) for ``method``, defaults filled in; MergeError for a setting
    another method owns or a value out of range."""
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; the methods are {', '.join(METHODS)}")
    if count < 1:
        raise MergeError("a merge needs at least one model")
    if method == "slerp" and count != 2:
        raise MergeError(f"slerp interpolates exactly 2 models, got {count}")
    if method in TASK_VECTOR_METHODS and base is None:
        raise MergeError(f"{method} needs the base the models were fine-tuned from (task vectors are model - base)")
    if method == "slerp" and base is not None:
        raise MergeError("slerp takes no base: it interpolates the two models themselves")
    owners = {"density": ("ties",), "drop": ("dare-linear", "dare-ties"), "t": ("slerp",),
              "weights": tuple(m for m in METHODS if m != "slerp")}
    for what, value in (("density", density), ("drop", drop), ("t", t), ("weights", weights)):
        if value is not None and method not in owners[what]:
            raise MergeError(f"{what} is a setting of {' and '.join(owners[what])}, not of {method}")
    if method not in TASK_VECTOR_METHODS and scale != 1.0:
        raise MergeError(f"scale (λ) applies to the task-vector methods ({', '.join(TASK_VECTOR_METHODS)}), not to "
                         f"{method}")
    if method == "ties":
        density = DEFAULT_DENSITY if density is None else density
        if not 0 < density <= 1:
            raise MergeError(f"density must be in (0, 1], got {density}")
    if method.startswith("dare"):
        drop = DEFAULT_DROP if drop is None else drop
        if not 0 <= drop < 1:
            raise MergeError(f"drop must be in [0, 1), got {drop}")
    if method == "slerp":
        t = DEFAULT_T if t is None else t
        if not 0 <= t <= 1:
            raise MergeError(f"t must be in [0, 1], got {t}")
    w = [1.0] * count if weights is None else [float(x) for x in weights]
    if len(w) != count:
        raise MergeError(f"weights: {len(w)} given for {count} models")
    if not all(math.isfinite(x) for x in w):
        raise MergeError(f"weights must be finite, got {w}")
    if method in ("ties", "dare-ties") and not all(x > 0 for x in w):
        raise MergeError(f"{method} weights must be positive (they weight a mean), got {w}")
    if method == "linear" and (any(x < 0 for x in w) or not sum(w) > 0):
        raise MergeError(f"linear weights must be non-negative with a positive sum, got {w}")
    return density, drop, t, w


def check_architecture(ref: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], name: str,
                       ref_name: str = "the base") -> None:
    """MergeError naming ``name`` unless ``sd`` has ``ref``'s keys, shapes and dtypes."""
    missing, extra = sorted(ref.keys() - sd.keys()), sorted(sd.keys() - ref.keys())
    if missing or extra:
        detail = "; ".join(f"{what} {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
                           for what, keys in (("lacks", missing), ("has extra", extra)) if keys)
        raise MergeError(f"{name} does not have the architecture of {ref_name}: it {detail}")
    for key, r in ref.items():
        x = sd[key]
        if x.shape != r.shape or x.dtype != r.dtype:
            raise MergeError(f"{name} does not have the architecture of {ref_name}: {key} is {tuple(x.shape)} "
                             f"{x.dtype}, {ref_name} has {tuple(r.shape)} {r.dtype}")


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """``tau`` with all but its top ⌈density·n⌉ entries by magnitude set to 0 (TIES's trim)."""
    k = math.ceil(density * tau.numel())
    flat = tau.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(tau)


def dare(tau: torch.Tensor, drop: float, generator: torch.Generator | None) -> torch.Tensor:
    """``tau`` with each entry dropped with probability ``drop`` and the rest rescaled by 1/(1 - drop)."""
    device = generator.device if generator is not None else "cpu"
    keep = (torch.rand(tau.shape, generator=generator, device=device) >= drop).to(tau.device)
    return torch.where(keep, tau / (1 - drop), torch.zeros_like(tau))


def disjoint_mean(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES's merge: each entry's sign elected by the sign of the weighted sum, then the weighted
    mean of the entries that agree with it (0 where the sum is 0)."""
    stacked = torch.stack(list(taus))
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * (stacked.dim() - 1))
    sign = torch.sign((w * stacked).sum(0))
    agree = (torch.sign(stacked) == sign) & (sign != 0)
    total = (w * agree).sum(0)  # 0 only where nothing agrees, and there the numerator is 0 too
    return (w * stacked * agree).sum(0) / total.clamp_min(torch.finfo(total.dtype).tiny)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1), the tensors taken as vectors;
    linear interpolation where they are nearly parallel or anti-parallel, or one is zero."""
    na, nb = a.norm(), b.norm()
    cos = float((a * b).sum() / (na * nb)) if na > 0 and nb > 0 else 1.0
    if abs(cos) > PARALLEL_COS:
        return (1 - t) * a + t * b
    omega = math.acos(cos)
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


# ---------------------------------------------------------------- models with different classes

def union_classes(classes: Sequence[Sequence[str]]) -> tuple[list[str], list[list[int]]]:
    """(the union of the models' classes, in order of first appearance: the first model's, then
    the next model's new ones, ...; for each model, the union's index of each of its classes)."""
    union: list[str] = []
    for names in classes:
        union.extend(c for c in names if c not in union)
    return union, [[union.index(c) for c in names] for names in classes]


def stack_heads(heads: Sequence[Mapping[str, torch.Tensor]], classes: Sequence[Sequence[str]]
                ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One classification head over the union of the models' classes (:func:`union_classes`), and
    that union. ``heads``: each model's head parameters (``weight``, ``bias``: one row per class,
    dim 0). A class's row is the mean of the rows of the models that predict it: a class only one
    model knows keeps that model's row unchanged."""
    union, where = union_classes(classes)
    first = heads[0]
    out = {}
    for key, x0 in first.items():
        acc = torch.zeros((len(union), *x0.shape[1:]), dtype=torch.float64)
        count = torch.zeros(len(union), dtype=torch.float64)
        for i, (head, idx) in enumerate(zip(heads, where)):
            x = head.get(key)
            if x is None or x.shape != (len(idx), *x0.shape[1:]):
                raise MergeError(f"the head of model {i} does not fit model 0's: {key} is "
                                 f"{None if x is None else tuple(x.shape)}, expected {(len(idx), *x0.shape[1:])}")
            acc.index_add_(0, torch.tensor(idx), x.detach().to("cpu", torch.float64))
            count.index_add_(0, torch.tensor(idx), torch.ones(len(idx), dtype=torch.float64))
        out[key] = (acc / count.view(-1, *[1] * (acc.dim() - 1))).to(x0.dtype)
    return out, union


def stack_logits(logits: Sequence[torch.Tensor], classes: Sequence[Sequence[str]]) -> torch.Tensor:
    """The models' outputs ``(N, C_i)`` side by side over the union of their classes ``(N, C)``: a
    class's logit is the mean of the logits of the models that predict it (the stacked head on each
    model's own features: the ensemble a stacked-head merge is compared with)."""
    union, where = union_classes(classes)
    first = logits[0]
    acc = first.new_zeros((first.shape[0], len(union)))
    count = first.new_zeros(len(union))
    for z, idx in zip(logits, where):
        acc.index_add_(1, torch.tensor(idx, device=z.device), z)
        count.index_add_(0, torch.tensor(idx, device=z.device), torch.ones(len(idx), dtype=z.dtype, device=z.device))
    return acc / count
