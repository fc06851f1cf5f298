"""Per-epoch metrics as JSON lines (``metrics.jsonl``, one object per finished epoch)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from reuse_core.files import atomic_open

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / METRICS_NAME

    def rewrite(self, rows: list[dict[str, Any]]) -> None:
        """Start the file over with ``rows``: a resumed run keeps exactly the epochs its checkpoint
        holds, whatever a killed run appended after that checkpoint."""
        with atomic_open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


def correct_count(outputs: Any, targets: torch.Tensor) -> int | None:
    """How many rows of class scores ``outputs`` (N, C) pick their target; None when the outputs
    are not such scores (a loss_fn may return anything as its outputs)."""
    if not (isinstance(outputs, torch.Tensor) and outputs.dim() == 2 and outputs.shape[0] == targets.shape[0]):
        return None
    return int((outputs.argmax(dim=1) == targets).sum())
