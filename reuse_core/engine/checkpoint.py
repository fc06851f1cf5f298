"""Checkpoints, written atomically (:mod:`reuse_core.files`): a run killed while saving one keeps
the previous one. They are torch.save'd tensors and plain values, read back with
``weights_only=True`` so loading one runs no code."""
from __future__ import annotations

import os
from typing import Any

import torch

from reuse_core.files import atomic_open

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    with atomic_open(path) as f:
        torch.save(state, f)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read back: truncated, tampered with, or not a checkpoint."""


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # unpickling errors, truncated zip archives, refused globals ...
        why = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"{path} cannot be read back ({type(e).__name__}: {why}): it is damaged or was "
                              "changed; remove it to start this run over") from None
