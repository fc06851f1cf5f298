"""What a training run is asked to do (:class:`TrainConfig`) and what it gives back (:class:`FitResult`)."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")

# Fields a resumed run may change without changing the weights it ends with.
RESUME_FREE = ("num_workers", "progress")

# A group of parameters trained at ``lr * scale``: the parameters themselves, or a dotted module
# name prefix ("features", "layer4") that stays meaningful in a saved config.
ParamGroup = tuple["Iterable[torch.nn.Parameter] | str", float]


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of one :func:`reuse_core.engine.fit` call.

    ``batch_size`` is the global batch of one forward pass: under torchrun each of N processes
    takes ``batch_size / N`` of it, so a run sees the same batches whatever N is. One optimizer
    step sees ``batch_size * grad_accum`` samples.
    ``param_groups``: ``[(params_or_module_prefix, lr_scale), ...]``; parameters in no group train
    at the full ``lr`` (use a scale below 1 for reused layers, 0 freezes them in all but name).
    ``warmup_epochs`` may be fractional; the learning rate is updated every optimizer step.
    ``amp`` takes effect on CUDA only (float16 autocast with a gradient scaler).
    ``progress``: a line per finished epoch (loss, accuracy, time), plus tqdm bars on a terminal;
    ``False`` silences both.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    step_epochs: int = 30
    step_gamma: float = 0.1
    grad_accum: int = 1
    seed: int = 0
    amp: bool = False
    num_workers: int = 0
    param_groups: list[ParamGroup] | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size", "grad_accum", "step_epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr!r}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            problems.append(f"warmup_epochs must be within 0..epochs ({self.epochs}), got {self.warmup_epochs!r}")
        if self.num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {self.num_workers!r}")
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))
        if self.param_groups is not None:  # a generator of parameters would be used up by the first look
            self.param_groups = [(g if isinstance(g, str) else list(g), float(s)) for g, s in self.param_groups]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: parameter groups become ``[(prefix or "<N params>", scale)]``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "param_groups"}
        out["param_groups"] = None if self.param_groups is None else [
            [g if isinstance(g, str) else f"<{len(g)} params>", s] for g, s in self.param_groups
        ]
        return out


@dataclasses.dataclass
class FitResult:
    """``epochs``: one metrics dict per finished epoch (as in metrics.jsonl). ``resumed_from``: the
    epoch the checkpoint had finished when ``resume=True`` found one, else 0."""

    epochs: list[dict[str, Any]]
    run_dir: str
    checkpoint: str
    resumed_from: int = 0

    @property
    def last(self) -> dict[str, Any]:
        return self.epochs[-1] if self.epochs else {}

    @property
    def last_val_accuracy(self) -> float | None:
        return self.last.get("val_accuracy")

    @property
    def best_val_accuracy(self) -> float | None:
        accs = [e["val_accuracy"] for e in self.epochs if e.get("val_accuracy") is not None]
        return max(accs) if accs else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs, "run_dir": self.run_dir, "checkpoint": self.checkpoint,
            "resumed_from": self.resumed_from, "last_val_accuracy": self.last_val_accuracy,
            "best_val_accuracy": self.best_val_accuracy,
        }
