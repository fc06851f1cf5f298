"""``finetune``: start from a stored model, put a fresh head on it for the target classes, and train
all of it (``full``), only the head on frozen features (``linear``), or the head and the last N
feature blocks (``partial``). Reused layers train at ``lr * reused_lr_scale``."""
from __future__ import annotations

import torch

from reuse_core import backbone
from reuse_core.strategy import (
    NAME_OPTION, Option, OptionError, Strategy, StrategyResult, data_options, fraction, non_negative, train_options,
)
from reuse_core.strategy.blocks import adapt_inputs, describe_adapter, finish, fit, load_splits

MODES = ("full", "linear", "partial")


def _eval_mode(module: torch.nn.Module, args) -> None:
    module.train(False)


def _keep_frozen_norms_in_eval(model: torch.nn.Module) -> None:
    """Frozen batch-norm layers keep normalising with their pretrained statistics: the engine puts
    the model in train mode every epoch, which would otherwise re-estimate them from the new data."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.register_forward_pre_hook(_eval_mode)


def run(ctx, options: dict) -> StrategyResult:
    source_id = ctx.model_id(options["model"])
    model, manifest = ctx.load_model(source_id)
    dataset = options["dataset"] or manifest["dataset"]
    if dataset is None:
        raise OptionError(f"option 'dataset': model {source_id} has no recorded dataset (it was imported); "
                          "say which dataset to fine-tune on")
    train, val, test = load_splits(options, dataset=dataset)
    config = dict(manifest["config"])
    adapter = adapt_inputs(manifest, train)
    if adapter is not None:  # images of another form than the model was built for
        model.register_forward_pre_hook(backbone.InputAdapter(**adapter), prepend=True)
        config["input_adapter"] = adapter
        ctx.log(f"finetune: adapted the inputs to the model: {describe_adapter(adapter, train)}")
    torch.manual_seed(options["seed"])  # the new head's initial weights follow the seed
    head = backbone.replace_head(model, len(train.classes))
    if options["mode"] != "full":
        backbone.freeze_features(model, options["trainable_blocks"] if options["mode"] == "partial" else 0)
        _keep_frozen_norms_in_eval(model)
    head_ids = {id(p) for p in head.parameters()}
    reused = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [(reused, options["reused_lr_scale"])] if reused else None
    fitted = fit(ctx, model, train, val, options, param_groups=groups)
    return finish(ctx, model, fitted=fitted, test=test, backbone=manifest["backbone"], config=config,
                  dataset=dataset, classes=train.classes, parents=[source_id], options=options)


FINETUNE = Strategy(
    name="finetune",
    description="adapt a stored model to new classes: fresh head, then full, linear-probe or partial fine-tuning",
    options=(
        Option("model", str, help="the model to start from: a recipe step, or a store ID, ID prefix or name", ref=True),
        Option("mode", str, "full", "full: train every layer; linear: only the head, on frozen features; "
               "partial: the head and the last --trainable-blocks feature blocks", choices=MODES),
        Option("trainable_blocks", int, 1, "partial mode: how many of the last feature blocks train", check=non_negative),
        Option("reused_lr_scale", float, 0.1, "learning rate of the reused (not head) layers, as a fraction of --lr",
               check=fraction),
        *data_options(classes_help="target class indices, e.g. 5-9 (default: all)", inherit_from="source model"),
        *train_options(lr=0.05),
        NAME_OPTION,
    ),
    run=run,
    examples=("reuse run finetune --model digits-0-4 --classes 5-9 --label-budget 10 --mode partial",),
)
