"""``pretrain``: train a registered backbone from scratch on a dataset or a class subset of it, and
save it to the store as the root of a lineage. With a label budget it is also the from-scratch
baseline a fine-tuned model is measured against."""
from __future__ import annotations

from reuse_core.builtin.strategies.common import (
    NAME_OPTION, backbone_options, build_model, data_options, fit, load_splits, save, train_options,
)
from reuse_core.strategy import Strategy, StrategyResult


def run(ctx, options: dict) -> StrategyResult:
    train, val, test = load_splits(options)
    model, config = build_model(options, train)
    fitted = fit(ctx, model, train, val, options)
    return save(ctx, model, backbone=options["backbone"], config=config, dataset=options["dataset"],
                classes=train.classes, parents=[], options=options, fitted=fitted, test=test)


PRETRAIN = Strategy(
    name="pretrain",
    description="train a backbone from scratch on a dataset (or some of its classes) and save it to the store",
    options=(*backbone_options(), *data_options(), *train_options(), NAME_OPTION),
    run=run,
)
