"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017) as
a reuse-core strategy: a third-party strategy through the same contract as the built-in ones.

A fresh student learns from a stored teacher by matching spatial attention maps: for the output
``A`` (N, C, H, W) of a feature block, ``Q = sum_c |A_c|^2`` (N, H, W), flattened and L2-normalised.
The loss is the student's cross-entropy plus ``beta / 2`` times, for each paired block, the mean
squared difference of the student's and the teacher's normalised maps (the paper's reference code).
Maps of different sizes are average-pooled to the smaller one. The teacher runs in eval mode
without grad.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reuse_core.builtin.strategies.common import (
    NAME_OPTION, backbone_options, build_model, data_options, fit, load_splits, save, train_options,
)
from reuse_core.builtin.strategies.distill import load_teacher
from reuse_core.strategy import Option, OptionError, Strategy, StrategyResult, non_negative


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W): the sum over channels of the squared activations."""
    return features.pow(2).sum(dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the L2-normalised attention maps of two (N, C, H, W) activations."""
    qs, qt = attention_map(student), attention_map(teacher)
    size = (min(qs.shape[-2], qt.shape[-2]), min(qs.shape[-1], qt.shape[-1]))
    qs, qt = (F.adaptive_avg_pool2d(q.unsqueeze(1), size).flatten(1) for q in (qs, qt))
    return (F.normalize(qs, dim=1) - F.normalize(qt, dim=1)).pow(2).mean()


class BlockOutputs:
    """Records the outputs of some blocks of a model on every forward pass."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._recorder(n)) for n in names]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _recorder(self, name: str):
        def hook(module, args, output):
            self.outputs[name] = output
        return hook


def spatial_blocks(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """The feature blocks whose output is a (N, C, H, W) map, in forward order."""
    seen = BlockOutputs(model, list(model.block_names))
    was_training = model.training
    with torch.no_grad():
        model.eval()(sample)
    model.train(was_training)
    seen.remove()
    return [n for n in model.block_names if seen.outputs[n].dim() == 4]


def block_pairs(teacher: nn.Module, student: nn.Module, sample: torch.Tensor, given: list[str] | None) -> list[tuple[str, str]]:
    """``given`` ("teacher_block:student_block" items), else the last k spatial blocks of each, in order."""
    if given:
        pairs = [tuple(p.split(":", 1)) for p in given]
        for t, s in pairs:
            for model, name, who in ((teacher, t, "teacher"), (student, s, "student")):
                if name not in model.block_names:
                    raise OptionError(f"strategy 'attention-transfer': option 'pairs': the {who} has no block {name!r} "
                                      f"(its blocks: {', '.join(model.block_names)})")
        return pairs
    tb, sb = spatial_blocks(teacher, sample), spatial_blocks(student, sample)
    k = min(len(tb), len(sb))
    if k == 0:
        raise OptionError("strategy 'attention-transfer': the teacher or the student has no feature block with "
                          "a spatial (N, C, H, W) output to take attention maps from")
    return list(zip(tb[-k:], sb[-k:]))


def _pair_check(values: list[str]) -> str | None:
    bad = [v for v in values if v.count(":") != 1 or "" in v.split(":")]
    return f"expected teacher_block:student_block items, got {bad}" if bad else None


def run(ctx, options: dict) -> StrategyResult:
    teacher, teacher_id, dataset, classes = load_teacher(ctx, options)
    train, val, test = load_splits(options, dataset=dataset, classes=classes)
    student, config = build_model(options, train, "student_")
    student.to(ctx.device)
    sample = train[0][0].unsqueeze(0).to(ctx.device)
    pairs = block_pairs(teacher, student, sample, options["pairs"])
    ctx.log(f"attention-transfer: teacher -> student blocks {', '.join(f'{t} -> {s}' for t, s in pairs)}")
    t_out = BlockOutputs(teacher, [t for t, _ in pairs])
    s_out = BlockOutputs(student, [s for _, s in pairs])
    beta = options["beta"]

    def loss_fn(model, inputs, targets):
        outputs = model(inputs)
        with torch.no_grad():
            teacher(inputs)
        at = sum(attention_loss(s_out.outputs[s], t_out.outputs[t]) for t, s in pairs)
        return F.cross_entropy(outputs, targets) + beta / 2 * at, outputs

    fitted = fit(ctx, student, train, val, options, loss_fn=loss_fn)
    return save(ctx, student, backbone=options["student_backbone"], config=config, dataset=dataset,
                classes=train.classes, parents=[teacher_id], options={**options, "pairs": [f"{t}:{s}" for t, s in pairs]},
                fitted=fitted, test=test)


ATTENTION_TRANSFER = Strategy(
    name="attention-transfer",
    description="train a fresh student to match a stored teacher's spatial attention maps "
                "(Zagoruyko & Komodakis 2017), plus cross-entropy",
    options=(
        Option("teacher", str, help="the teacher: a recipe step, or a store ID, ID prefix or name", ref=True),
        Option("beta", float, 1000.0, "weight of the attention term (the paper's beta; the loss adds beta/2 times it)",
               check=non_negative),
        Option("pairs", list, None, "teacher_block:student_block pairs whose attention maps are matched "
               "(default: the last k spatial blocks of each, in order)", check=_pair_check),
        *backbone_options("student_", what="student"),
        *data_options(classes_help="the dataset's class indices for the teacher's outputs, in order "
                      "(default: the teacher's classes)", inherit_from="teacher"),
        *train_options(),
        NAME_OPTION,
    ),
    run=run,
)
