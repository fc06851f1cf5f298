"""Argument checks shared by the op wrappers: clear errors that name the argument."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def float_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float64, bfloat16, float16), got {x.dtype}")


def same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; put them on one device")


def number(name: str, value) -> float:
    """``value`` as a float; a real number only (a string such as '4', a bool or a complex is refused)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def positive_finite(name: str, value) -> float:
    v = number(name, value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return v


def finite_nonneg(name: str, value) -> float:
    v = number(name, value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return v


def int64(name: str, value) -> int:
    """``value`` as an int that fits the kernels' int64 (a bool or a float is refused)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    v = int(value)
    if not -(2**63) <= v < 2**63:
        raise ValueError(f"{name} must be an integer in [-2**63, 2**63) (int64), got {v}")
    return v


def integer_labels(name: str, labels) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")


def choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
