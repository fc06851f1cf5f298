"""Tiny synthetic data and models for the engine tests (also imported by the subprocess scripts)."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def blobs(n: int = 96, features: int = 6, classes: int = 3, seed: int = 0) -> TensorDataset:
    """Gaussian blobs around fixed random centres: learnable in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, features, generator=torch.Generator().manual_seed(1234)) * 2.5
    y = torch.arange(n) % classes
    x = centres[y] + torch.randn(n, features, generator=g)
    return TensorDataset(x, y)


def mlp(features: int = 6, classes: int = 3, hidden: int = 16, dropout: float = 0.0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(hidden, classes))
