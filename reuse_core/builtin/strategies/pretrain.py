"""``pretrain``: train a registered backbone from scratch on a dataset or a class subset of it, and
save it to the store as the root of a lineage. With a label budget it is also the from-scratch
baseline a fine-tuned model is measured against."""
from __future__ import annotations

from reuse_core.strategy import (
    NAME_OPTION, Strategy, StrategyResult, augment_option, backbone_options, data_options, train_options,
)
from reuse_core.strategy.blocks import augmentation, build_model, finish, fit, load_splits


def run(ctx, options: dict) -> StrategyResult:
    train, val, test = load_splits(options)
    model, config = build_model(options, train)
    fitted = fit(ctx, model, train, val, options, augment=augmentation(options, train))
    return finish(ctx, model, fitted=fitted, test=test, backbone=options["backbone"], config=config,
                  dataset=options["dataset"], classes=train.classes, parents=[], options=options, train=train)


PRETRAIN = Strategy(
    name="pretrain",
    description="train a backbone from scratch on a dataset (or some of its classes) and save it to the store",
    options=(*backbone_options(), augment_option(), *data_options(), *train_options(), NAME_OPTION),
    run=run,
    examples=("reuse run pretrain --backbone small-cnn --classes 0-4 --epochs 5 --name digits-0-4",),
)
