"""``finetune``: start from a stored model, put a fresh head on it for the target classes, and train
all of it (``full``), only the head on frozen features (``linear``), the head and the last N feature
blocks (``partial``), or the head first and then everything (``lp-ft``, Kumar et al., ICLR 2022:
a head trained on the frozen features first keeps the fine-tuning from distorting them). Reused
layers train at ``lr * reused_lr_scale``.

A model whose training images (its ancestors' included) overlap this run's test split is refused:
its test accuracy would be measured on images it has seen.
"""
from __future__ import annotations

import torch

from reuse_core import backbone
from reuse_core.strategy import (
    NAME_OPTION, Option, OptionError, Strategy, StrategyResult, augment_option, data_options, fraction, non_negative,
    train_options,
)
from reuse_core.strategy.blocks import (
    adapt_inputs, augmentation, check_unseen, describe_adapter, finish, fit, load_splits,
)

MODES = ("full", "linear", "partial", "lp-ft")
PROBE_DIR = "linear-probe"  # lp-ft's first phase trains in this folder of the run directory


def _eval_mode(module: torch.nn.Module, args) -> None:
    module.train(False)


def _keep_frozen_norms_in_eval(model: torch.nn.Module) -> list:
    """Frozen batch-norm layers keep normalising with their pretrained statistics: the engine puts
    the model in train mode every epoch, which would otherwise re-estimate them from the new data.
    Returns the hooks' handles."""
    return [m.register_forward_pre_hook(_eval_mode) for m in model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters())]


def lp_ft_epochs(epochs: int) -> tuple[int, int]:
    """(linear-probe epochs, fine-tuning epochs) of ``--mode lp-ft``: half each, the odd one to the
    fine-tuning."""
    return epochs // 2, epochs - epochs // 2


def _lp_ft(ctx, model, train, val, options, augment):
    """Train the head on frozen features, then everything at the reused learning rate."""
    if options["epochs"] < 2 or options["reused_lr_scale"] == 0:
        raise OptionError("option 'mode': lp-ft needs --epochs of at least 2 (one per phase) and a --reused-lr-scale "
                          f"above 0 (the rate of its second phase), got {options['epochs']} and {options['reused_lr_scale']}")
    probe, tune = lp_ft_epochs(options["epochs"])
    backbone.freeze_features(model, 0)
    hooks = _keep_frozen_norms_in_eval(model)
    phase = {**options, "epochs": probe, "warmup_epochs": min(options["warmup_epochs"], probe)}
    probed = fit(ctx, model, train, val, phase, augment=augment, run_dir=ctx.run_dir / PROBE_DIR)
    for h in hooks:
        h.remove()
    model.requires_grad_(True)
    phase = {**options, "epochs": tune, "warmup_epochs": min(options["warmup_epochs"], tune),
             "lr": options["lr"] * options["reused_lr_scale"]}
    fitted = fit(ctx, model, train, val, phase, augment=augment)
    fitted.epochs = [{**e, "phase": "linear-probe"} for e in probed.epochs] + [{**e, "phase": "fine-tune"}
                                                                              for e in fitted.epochs]
    return fitted


def run(ctx, options: dict) -> StrategyResult:
    source_id = ctx.model_id(options["model"])
    model, manifest = ctx.load_model(source_id)
    dataset = options["dataset"] or manifest["dataset"]
    if dataset is None:
        raise OptionError(f"option 'dataset': model {source_id} has no recorded dataset (it was imported); "
                          "say which dataset to fine-tune on")
    train, val, test = load_splits(options, dataset=dataset)
    check_unseen(ctx, [source_id], test, options, dataset=dataset)
    config = dict(manifest["config"])
    adapter = adapt_inputs(manifest, train)
    if adapter is not None:  # images of another form than the model was built for
        model.register_forward_pre_hook(backbone.InputAdapter(**adapter), prepend=True)
        config["input_adapter"] = adapter
        ctx.log(f"finetune: adapted the inputs to the model: {describe_adapter(adapter, train)}")
    torch.manual_seed(options["seed"])  # the new head's initial weights follow the seed
    head = backbone.replace_head(model, len(train.classes))
    augment = augmentation(options, train)
    if options["mode"] == "lp-ft":
        fitted = _lp_ft(ctx, model, train, val, options, augment)
    else:
        if options["mode"] != "full":
            backbone.freeze_features(model, options["trainable_blocks"] if options["mode"] == "partial" else 0)
            _keep_frozen_norms_in_eval(model)
        head_ids = {id(p) for p in head.parameters()}
        reused = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
        groups = [(reused, options["reused_lr_scale"])] if reused else None
        fitted = fit(ctx, model, train, val, options, augment=augment, param_groups=groups)
    return finish(ctx, model, fitted=fitted, test=test, backbone=manifest["backbone"], config=config,
                  dataset=dataset, classes=train.classes, parents=[source_id], options=options, train=train)


FINETUNE = Strategy(
    name="finetune",
    description="adapt a stored model to new classes: fresh head, then full, linear-probe, partial or LP-FT fine-tuning",
    options=(
        Option("model", str, help="the model to start from: a recipe step, or a store ID, ID prefix or name", ref=True),
        Option("mode", str, "full", "full: train every layer; linear: only the head, on frozen features; "
               "partial: the head and the last --trainable-blocks feature blocks; lp-ft: the first half of the "
               "epochs only the head (a linear probe), the rest every layer at the reused learning rate "
               "(--lr times --reused-lr-scale)", choices=MODES),
        Option("trainable_blocks", int, 1, "partial mode: how many of the last feature blocks train", check=non_negative),
        Option("reused_lr_scale", float, 0.3, "learning rate of the reused (not head) layers, as a fraction of --lr",
               check=fraction),
        augment_option(),
        *data_options(classes_help="target class indices, e.g. 5-9 (default: all)", inherit_from="source model"),
        *train_options(lr=0.05),
        NAME_OPTION,
    ),
    run=run,
    examples=("reuse run finetune --model digits-0-4 --classes 5-9 --label-budget 10 --mode partial",
              "reuse run finetune --model digits-simclr --classes 5-9 --label-budget 1 --mode lp-ft --epochs 50"),
)
