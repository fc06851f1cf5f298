"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017), a
strategy written on reuse-core's public authoring surface only.

A fresh student matches a stored teacher's spatial attention maps: for a block's output A (N, C, H, W),
Q = sum_c A_c^2, flattened and L2-normalised. The loss is cross-entropy plus beta/2 times, per paired
block, the mean squared difference of the normalised maps (the paper's reference code); maps of
different sizes are average-pooled to the smaller one.
"""
import torch
import torch.nn.functional as F

from reuse_core.strategy import (
    NAME_OPTION, PAIRS_OPTION, TEACHER_OPTION, Option, Strategy, backbone_options, data_options, non_negative,
    train_options,
)
from reuse_core.strategy.blocks import FeatureTaps, build_model, finish, fit, load_splits, load_teacher, pair_blocks


def attention_map(features: torch.Tensor) -> torch.Tensor:
    return features.pow(2).sum(dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    qs, qt = attention_map(student), attention_map(teacher)
    size = (min(qs.shape[-2], qt.shape[-2]), min(qs.shape[-1], qt.shape[-1]))
    qs, qt = (F.adaptive_avg_pool2d(q.unsqueeze(1), size).flatten(1) for q in (qs, qt))
    return (F.normalize(qs, dim=1) - F.normalize(qt, dim=1)).pow(2).mean()


def run(ctx, options):
    teacher, teacher_id, dataset, classes = load_teacher(ctx, options)
    train, val, test = load_splits(options, dataset=dataset, classes=classes)
    student, config = build_model(options, train, "student_")
    pairs = pair_blocks(teacher, student.to(ctx.device), train[0][0][None].to(ctx.device), options["pairs"])
    ctx.log(f"attention-transfer: teacher -> student blocks {', '.join(f'{t} -> {s}' for t, s in pairs)}")
    t_out, s_out = FeatureTaps(teacher, [t for t, _ in pairs]), FeatureTaps(student, [s for _, s in pairs])

    def loss_fn(model, inputs, targets):
        outputs = model(inputs)
        with torch.no_grad():
            teacher(inputs)
        at = sum(attention_loss(s_out.outputs[s], t_out.outputs[t]) for t, s in pairs)
        return F.cross_entropy(outputs, targets) + options["beta"] / 2 * at, outputs

    fitted = fit(ctx, student, train, val, options, loss_fn=loss_fn)
    return finish(ctx, student, fitted=fitted, test=test, backbone=options["student_backbone"], config=config,
                  dataset=dataset, classes=train.classes, parents=[teacher_id],
                  options={**options, "pairs": [f"{t}:{s}" for t, s in pairs]})


ATTENTION_TRANSFER = Strategy(
    name="attention-transfer",
    description="train a fresh student to match a stored teacher's spatial attention maps "
                "(Zagoruyko & Komodakis 2017), plus cross-entropy",
    options=(
        TEACHER_OPTION,
        Option("beta", float, 1000.0, "weight of the attention term (the loss adds beta/2 times it)", check=non_negative),
        PAIRS_OPTION, *backbone_options("student_", what="student"),
        *data_options(classes_help="the dataset's class indices for the teacher's outputs (default: the teacher's)",
                      inherit_from="teacher"),
        *train_options(), NAME_OPTION,
    ),
    run=run,
)
