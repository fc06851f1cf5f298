"""Optimizers, learning-rate groups and schedules (linear warm-up, then constant, step or cosine),
stepped once per optimizer step."""
from __future__ import annotations

import math

import torch

from reuse_core.engine.config import TrainConfig


def param_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """One optimizer group per ``config.param_groups`` entry (``lr * scale``), then one at the full
    lr for every trainable parameter in no group. Frozen parameters (requires_grad False) are left
    out, so a linear probe's optimizer holds only the head."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    taken: set[int] = set()
    groups = []
    for spec, scale in config.param_groups or []:
        if isinstance(spec, str):
            prefix = spec.rstrip(".") + "."
            params = [p for n, p in model.named_parameters() if (n + ".").startswith(prefix)]
            if not params:
                raise ValueError(f"param_groups: no parameter of the model is under {spec!r}")
        else:
            params = list(spec)
        params = [p for p in params if p.requires_grad and id(p) not in taken]
        taken.update(id(p) for p in params)
        if params:
            groups.append({"params": params, "lr": config.lr * scale, "lr_scale": scale})
    rest = [p for p in trainable if id(p) not in taken]
    if rest:
        groups.append({"params": rest, "lr": config.lr, "lr_scale": 1.0})
    if not groups:
        raise ValueError("the model has no trainable parameter (every requires_grad is False)")
    return groups


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, config)
    wd = config.weight_decay
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=wd)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, weight_decay=wd)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=wd)


def lr_factor(step: int, steps_per_epoch: int, config: TrainConfig) -> float:
    """The multiplier of every group's lr after ``step`` optimizer steps."""
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "step":
        return config.step_gamma ** ((step // steps_per_epoch) // config.step_epochs)
    if config.schedule == "cosine":
        span = max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, config))
