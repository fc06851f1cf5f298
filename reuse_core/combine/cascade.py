"""Sequential combination: models from cheap to expensive, each input leaving at the first model
confident enough about it.

Confidences are the top softmax probability after temperature scaling (:mod:`.calibration`).
One threshold ``t`` is shared by every stage but the last: an input stops at the first stage whose
confidence is at least ``t``; the last stage takes what is left. A threshold sweep over validation
outputs gives accuracy against mean compute; :func:`choose` picks the point for a target.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

# At most this many thresholds in a sweep (quantiles of the confidences when there are more).
MAX_THRESHOLDS = 512


def flops_per_sample(model: nn.Module, example: torch.Tensor) -> float:
    """Forward FLOPs per sample of ``model`` on the batch ``example`` (PyTorch's FLOP counter:
    matrix products and convolutions; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode  # imports triton: 0.1 s that listing commands skip

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / example.shape[0]


def seconds_per_sample(model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 256, repeats: int = 3) -> float:
    """Measured inference time per sample over ``inputs`` (the best of ``repeats`` passes, after a warm-up)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(inputs[:batch_size])
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                for i in range(0, len(inputs), batch_size):
                    model(inputs[i:i + batch_size])
                best = min(best, time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return best / len(inputs)


@dataclass
class CascadePoint:
    """One threshold of a sweep: accuracy, mean compute per sample (FLOPs and seconds, the stages'
    costs weighted by the share of inputs that reach them), and the share leaving at each stage."""

    threshold: float
    accuracy: float
    flops: float
    seconds: float
    exits: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def confidences(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, dim=-1).max(-1).values


def _exit_stage(confs: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """For thresholds ``(T,)`` and confidences ``(S-1, N)`` of the non-final stages: the stage each
    input leaves at, ``(T, N)``."""
    S1, N = confs.shape
    sure = confs.unsqueeze(0) >= thresholds.view(-1, 1, 1)              # (T, S-1, N)
    sure = torch.cat([sure, sure.new_ones(len(thresholds), 1, N)], 1)   # the last stage takes the rest
    return sure.int().argmax(1)                                         # first stage that is sure


def sweep(stage_logits: Sequence[torch.Tensor], targets: torch.Tensor, *, temperatures: Sequence[float],
          flops: Sequence[float], seconds: Sequence[float],
          thresholds: torch.Tensor | None = None) -> list[CascadePoint]:
    """Accuracy and mean compute of the cascade for each threshold (default: every distinct
    confidence of the non-final stages, plus one above 1 that sends every input to the last stage)."""
    S = len(stage_logits)
    if not (S == len(temperatures) == len(flops) == len(seconds)) or S < 2:
        raise ValueError(f"a cascade needs >= 2 stages, with one temperature, FLOP count and time each; got "
                         f"{S} outputs, {len(temperatures)} temperatures, {len(flops)} FLOP counts, {len(seconds)} times")
    confs = torch.stack([confidences(z, t) for z, t in zip(stage_logits[:-1], temperatures[:-1])])
    if thresholds is None:
        cand = torch.unique(confs)
        if len(cand) > MAX_THRESHOLDS:
            cand = torch.quantile(cand, torch.linspace(0, 1, MAX_THRESHOLDS, dtype=torch.float64))
        thresholds = torch.cat([cand, torch.tensor([1.0 + 1e-9], dtype=torch.float64)])
    thresholds = thresholds.double()
    stage = _exit_stage(confs, thresholds)                                   # (T, N)
    hits = torch.stack([z.argmax(-1) == targets for z in stage_logits])      # (S, N)
    correct = hits.gather(0, stage).double().mean(1)                         # (T,)
    exits = torch.stack([(stage == s).double().mean(1) for s in range(S)], 1)  # (T, S)
    reach = exits.flip(1).cumsum(1).flip(1)                                  # share reaching each stage
    mean_flops = reach @ torch.tensor(flops, dtype=torch.float64)
    mean_seconds = reach @ torch.tensor(seconds, dtype=torch.float64)
    return [CascadePoint(float(t), float(a), float(f), float(s), e.tolist())
            for t, a, f, s, e in zip(thresholds, correct, mean_flops, mean_seconds, exits)]


def choose(points: Sequence[CascadePoint], *, min_accuracy: float | None = None,
           max_flops: float | None = None) -> tuple[CascadePoint, bool]:
    """The point for a target, and whether the target is met.

    ``min_accuracy``: the cheapest point at least that accurate (when none is, the most accurate).
    ``max_flops``: the most accurate point within that mean compute (when none is, the cheapest).
    Ties go to the more accurate, then the cheaper point.
    """
    if (min_accuracy is None) == (max_flops is None):
        raise ValueError("choose needs exactly one target: min_accuracy or max_flops")
    best_first = sorted(points, key=lambda p: (-p.accuracy, p.flops))
    cheap_first = sorted(points, key=lambda p: (p.flops, -p.accuracy))
    if min_accuracy is not None:
        ok = [p for p in cheap_first if p.accuracy >= min_accuracy]
        return (ok[0], True) if ok else (best_first[0], False)
    ok = [p for p in best_first if p.flops <= max_flops]
    return (ok[0], True) if ok else (cheap_first[0], False)


class Cascade(nn.Module):
    """Runs the stages in order on the inputs still undecided; returns, per input, the
    temperature-scaled logits of the stage it left at (so softmax gives the calibrated probabilities)."""

    def __init__(self, stages: Sequence[nn.Module], temperatures: Sequence[float], threshold: float):
        super().__init__()
        if len(stages) < 2 or len(stages) != len(temperatures):
            raise ValueError(f"a cascade needs >= 2 stages and one temperature each, got {len(stages)} and {len(temperatures)}")
        self.stages = nn.ModuleList(stages)
        self.register_buffer("temperatures", torch.tensor([float(t) for t in temperatures]))
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        todo = torch.arange(x.shape[0], device=x.device)
        for k, stage in enumerate(self.stages):
            z = stage(x[todo]) / self.temperatures[k]
            if out is None:
                out = z.new_empty((x.shape[0], z.shape[-1]))
            last = k == len(self.stages) - 1
            done = torch.ones_like(todo, dtype=torch.bool) if last else torch.softmax(z, -1).amax(-1) >= self.threshold
            out[todo[done]] = z[done]
            todo = todo[~done]
            if todo.numel() == 0:
                break
        return out

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:.6g}"
