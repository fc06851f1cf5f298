"""``selfsup``: self-supervised pretraining (SimCLR, Chen et al., 2020) on a dataset's training
images, their labels unused.

Every batch is augmented twice, each example with its own random parameters; the backbone's
features (what its head would see) go through a projection head (Linear, BatchNorm, ReLU, Linear),
and the NT-Xent loss pulls the two views of each image together and pushes them from the other
2N - 2 views of the batch, at a temperature. The validation and test splits are never trained on:
the contrastive loss on the validation images (their labels unused too) is reported. Under
torchrun the negatives are the views of each process's share of the batch.

The projection head serves pretraining only. The saved model is the backbone with a classification
head for the images' classes that was never trained (``head_trained`` false): a lineage root for
``finetune``, whose metrics' ``training_data`` records the images (split seed, indices) and that
no label was used (``labelled`` 0). Strategies that use a model's outputs (``distill``,
``ensemble``, ``cascade``) refuse it until it is fine-tuned.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from reuse_core import backbone
from reuse_core.strategy import (
    NAME_OPTION, Option, Strategy, StrategyResult, augment_option, backbone_options, data_options, positive,
    train_options,
)
from reuse_core.strategy.blocks import augmentation, build_model, fit, load_splits, training_data


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """The NT-Xent loss of 2N projections in which rows i and N + i are views of one image: the
    cross-entropy of picking each row's partner among the other 2N - 1 rows by cosine similarity
    divided by ``temperature``, averaged over the rows."""
    z = F.normalize(z.float(), dim=1)
    n = len(z) // 2
    logits = (z @ z.T / temperature).masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, partner)


class Contrastive(nn.Module):
    """The backbone (its head replaced by an identity: its output is the features) and the
    projection head on them."""

    def __init__(self, features: nn.Module, width: int, projection_width: int):
        super().__init__()
        self.features = features
        self.projector = nn.Sequential(nn.Linear(width, projection_width), nn.BatchNorm1d(projection_width),
                                       nn.ReLU(), nn.Linear(projection_width, projection_width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.features(x).flatten(1))


def _views_loss(augment, temperature: float):
    def loss_fn(model, inputs, targets):  # targets (the labels) are not used
        z = model(torch.cat([augment(inputs), augment(inputs)]))
        return nt_xent(z, temperature), z
    return loss_fn


def contrastive_loss(model: nn.Module, data, loss_fn, *, batch_size: int, seed: int, device) -> float:
    """The mean NT-Xent loss over ``data`` in eval mode, its views drawn from ``seed``."""
    total = count = 0.0
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for x, y in DataLoader(data, batch_size=batch_size):
            if len(x) > 1:  # a lone image has no negatives
                total += float(loss_fn(model, x.to(device), y)[0]) * len(x)
                count += len(x)
    model.train(was_training)
    return total / count if count else float("nan")


def run(ctx, options: dict) -> StrategyResult:
    train, val, _ = load_splits(options)  # the test split is never looked at
    model, config = build_model(options, train)
    head = backbone.get_head(model)
    backbone.set_head(model, nn.Identity())
    with torch.no_grad():
        width = model.eval()(train[0][0][None]).flatten(1).shape[1]
    net = Contrastive(model.train(), width, options["projection_width"])
    loss_fn = _views_loss(augmentation(options, train), options["temperature"])
    fitted = fit(ctx, net, train, None, options, loss_fn=loss_fn)
    val_loss = contrastive_loss(net, val, loss_fn, batch_size=options["batch_size"], seed=options["seed"],
                                device=ctx.device)
    backbone.set_head(model, head.to(ctx.device))
    metrics = {
        "train_loss": fitted.last.get("train_loss"), "val_contrastive_loss": val_loss, "epochs": len(fitted.epochs),
        "train_examples": len(train), "labelled": 0, "head_trained": False,
        "training_data": training_data(ctx, options, train, dataset=options["dataset"], labelled=0),
    }
    ctx.log(f"selfsup: contrastive loss {metrics['train_loss']:.4f} on the training images, {val_loss:.4f} on the "
            f"validation images ({len(train)} images, labels unused)")
    model_id = ctx.save(model, backbone=options["backbone"], config=config, dataset=options["dataset"],
                        classes=train.classes, metrics=metrics, parents=[], options=options, name=options["name"])
    return StrategyResult(metrics=metrics, models=[model_id] if model_id else [])


SELFSUP = Strategy(
    name="selfsup",
    description="self-supervised (SimCLR) pretraining on a dataset's training images, without their labels",
    options=(
        *backbone_options(default="small-cnn"),
        augment_option("strong", choices=("light", "strong"), extra=". Each image gets two draws a step: its two views"),
        Option("temperature", float, 0.5, "temperature of the NT-Xent loss (lower: sharper contrast between the "
               "positive pair and the negatives)", check=positive),
        Option("projection_width", int, 128, "width of the projection head's layers (used while pretraining only)",
               check=positive),
        *data_options(label_budget=False, classes_help="classes whose training images to pretrain on, e.g. 0-9 (their "
                      "labels are not used; default: all)"),
        *train_options(epochs=50, lr=0.5, batch_size=256, weight_decay=5e-3),
        NAME_OPTION,
    ),
    run=run,
    examples=("reuse run selfsup --backbone small-cnn --name digits-simclr",
              "reuse run selfsup --classes 0-4 --temperature 0.3 --epochs 30"),
)
