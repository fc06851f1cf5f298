"""The lifecycle hooks the trainer calls (their contracts are in reuse_core.hookspecs). The caller
hands the trainer a relay, usually ``reuse_core.plugins.lifecycle_relay()``; without one the
trainer uses :data:`NO_HOOKS`, so the engine never has to import the plugin manager."""
from __future__ import annotations

from typing import Any

import torch


class NoHooks:
    """A relay with no implementations: every hook does nothing."""

    def reuse_run_start(self, *, strategy: str, options: dict, run_dir: str) -> None:
        return None

    def reuse_epoch_end(self, *, strategy: str, epoch: int, metrics: dict) -> None:
        return None

    def reuse_run_end(self, *, strategy: str, result: dict) -> None:
        return None

    def reuse_adjust_loss(self, *, strategy: str, loss, model, inputs, targets, outputs) -> None:
        return None


NO_HOOKS = NoHooks()


def loss_terms(returned: Any) -> list[torch.Tensor]:
    """The terms a reuse_adjust_loss call returned: a pluggy relay gives a list of the non-None
    results, a plain object one value or None."""
    if returned is None:
        return []
    if isinstance(returned, (list, tuple)):
        return [t for t in returned if t is not None]
    return [returned]
