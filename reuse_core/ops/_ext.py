"""Loads the compiled kernels (reuse_core._C) and says which backend runs each op.

When the extension is missing, or was built without the backend a tensor lives on, the ops
fall back to the pure-PyTorch references in :mod:`reuse_core.ops.reference`, with one warning.
"""
from __future__ import annotations

import json
import warnings

import torch

try:
    from reuse_core import _C  # noqa: F401  (importing it registers torch.ops.reuse_core.*)

    LOAD_ERROR: str | None = None
except ImportError as exc:  # built without the extension, or built for another torch
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

OPS = ("distill_kl", "ensemble_average", "attention", "fused_linear_distill")
BACKENDS = ("CPU", "CUDA")
_warned: set[tuple[str, str]] = set()


def available() -> bool:
    """True when reuse_core._C was imported."""
    return _C is not None


def build_info() -> dict:
    """What the extension was built with: CPU code path in use, CUDA or not, CUDA archs."""
    if _C is None:
        return {"cpu_isa": None, "cuda": False, "cuda_archs": ""}
    return json.loads(torch.ops.reuse_core.build_info())


def empty_cache() -> int:
    """Give back the memory of the CPU kernels' output cache: large outputs come from huge-page
    blocks that are kept for reuse once their tensors are freed (up to REUSE_CORE_CPU_CACHE_MB).
    Returns the bytes released; blocks of live tensors are untouched. 0 without the extension."""
    return int(torch.ops.reuse_core.empty_cache()) if _C is not None else 0


def has_kernel(op: str, backend: str) -> bool:
    """True when the compiled `op` has a kernel registered for `backend` ("CPU" or "CUDA")."""
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"reuse_core::{op}", backend)


# Fixed once the extension is loaded; a plain set keeps use_kernel traceable by torch.compile.
_KERNELS = frozenset((op, b) for op in OPS for b in BACKENDS if has_kernel(op, b))


def use_kernel(op: str, device: torch.device) -> bool:
    """Whether `op` on `device` runs the compiled kernel; warns once per (op, backend) if not."""
    backend = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else device.type
    if (op, backend) in _KERNELS:
        return True
    if not torch.compiler.is_compiling() and (op, backend) not in _warned:
        _warned.add((op, backend))
        why = LOAD_ERROR or f"the extension was built without a {backend} kernel"
        warnings.warn(
            f"reuse_core: {op} on {backend} falls back to the pure-PyTorch reference ({why}); "
            "run `reuse doctor` for details.",
            RuntimeWarning,
            stacklevel=3,
        )
    return False
