"""``ensemble``: K members combined through the fused ensemble average (or a vote), saved to the
store as one model whose lineage names its members.

Members come from the store (any architectures with the same classes) or are trained here, all K
at once as one batched model (:class:`~reuse_core.combine.BatchedMembers`: one vmapped forward,
backward and optimizer step per batch), then saved one by one. The weights (uniform, proportional
to validation accuracy, or learned on the validation split) are chosen on validation outputs.

A stored ensemble has backbone ``"ensemble"``; its config lists the members (store ID, backbone,
config), the combination and the weights, and its weights file holds every member's weights, so it
loads (``RunContext.load_model``, e.g. as a ``distill`` teacher) without its members in the store.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from reuse_core.backbone import build as build_backbone
from reuse_core.combine import (
    COMBINES, WEIGHTINGS, BatchedMembers, Ensemble, choose_weights, collect_logits, majority_vote, member_accuracies,
    member_loss,
)
from reuse_core.ops import ensemble_average
from reuse_core.strategy import (
    NAME_OPTION, Option, OptionError, Strategy, StrategyResult, augment_option, backbone_options, data_options, positive,
    register_model_loader, train_options,
)
from reuse_core.strategy.blocks import augmentation, build_model, fit, load_splits, load_stored, training_data

BACKBONE = "ensemble"


class JointMembers(nn.Module):
    """K batched members as the engine trains them: in training mode the forward gives every
    member's output ``(K, B, C)`` (for :func:`member_loss`); in eval mode their uniform
    probability average (log domain), so the engine's per-epoch validation measures the ensemble."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.batched = BatchedMembers(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.batched(x)
        return out if self.training else ensemble_average(out, mode="log_probs")


def _joint_loss(model, inputs, targets):
    out = model(inputs)
    return member_loss(out, targets), ensemble_average(out.detach(), mode="log_probs")


def load_ensemble(manifest: dict, state: dict) -> Ensemble:
    """A stored ensemble rebuilt: every member from its backbone and config, then all weights."""
    cfg = manifest["config"]
    members = [build_backbone(m["backbone"], len(manifest["classes"]), **m["config"]) for m in cfg["members"]]
    model = Ensemble(members, combine=cfg["combine"], weights=cfg["weights"])
    model.load_state_dict(state)
    return model


register_model_loader(BACKBONE, load_ensemble)


def _batches(data):
    return DataLoader(data, batch_size=256)


def _stored_members(ctx, options):
    if options["augment"] != "none":
        raise OptionError("option 'augment': it augments the training of members trained here (--backbone); "
                          "stored --members are only combined")
    ids, members, manifests, dataset, val, test = load_stored(ctx, options["members"], options, "member")
    specs = [{"id": i, "backbone": m["backbone"], "config": m["config"]} for i, m in zip(ids, manifests)]
    return members, specs, dataset, val, test, None, None


def _trained_members(ctx, options):
    if not options["backbone"]:
        raise ValueError("ensemble: give --members (stored models) or --backbone (members trained here)")
    options = {**options, "dataset": options["dataset"] or "digits"}
    train, val, test = load_splits(options)
    # member 0 starts as a pretrain with this seed would; the others from the next draws of its stream
    first, config = build_model(options, train)
    joint = JointMembers([first, *(build_backbone(options["backbone"], len(train.classes), **config)
                                   for _ in range(options["num_members"] - 1))])
    fitted = fit(ctx, joint, train, val, options, loss_fn=_joint_loss, augment=augmentation(options, train))
    members = [m.eval() for m in joint.batched.unstack()]
    specs = [{"id": None, "backbone": options["backbone"], "config": config} for _ in members]
    return members, specs, options["dataset"], val, test, fitted, training_data(ctx, options, train,
                                                                                dataset=options["dataset"])


def _save_members(ctx, options, members, specs, dataset, classes, val_acc, test_acc, trained_on) -> None:
    """Members trained here go to the store one by one, each with its accuracies and training data."""
    for k, (m, spec, va, ta) in enumerate(zip(members, specs, val_acc, test_acc)):
        spec["id"] = ctx.save(m, backbone=spec["backbone"], config=spec["config"], dataset=dataset, classes=classes,
                              metrics={"val_accuracy": va, "test_accuracy": ta, "training_data": trained_on},
                              parents=[], options=options, key=f"member-{k}")


def run(ctx, options: dict) -> StrategyResult:
    if options["members"]:
        if len(options["members"]) < 2:
            raise ValueError(f"ensemble: --members needs at least 2 models, got {options['members']}")
        members, specs, dataset, val, test, fitted, trained_on = _stored_members(ctx, options)
    else:
        members, specs, dataset, val, test, fitted, trained_on = _trained_members(ctx, options)
    val_logits, val_y = collect_logits(members, _batches(val), ctx.device)
    test_logits, test_y = collect_logits(members, _batches(test), ctx.device)
    combine, weighting = options["combine"], options["weighting"]
    weights = choose_weights(weighting, val_logits, val_y, mode="probs" if combine == "vote" else combine)
    ensemble = Ensemble(members, combine=combine, weights=weights)
    test_scores = ensemble.combine_logits(test_logits)
    member_test = member_accuracies(test_logits, test_y)
    metrics = {
        "test_accuracy": float((test_scores.argmax(-1) == test_y).float().mean()),
        "test_loss": float(torch.nn.functional.cross_entropy(test_scores, test_y)),
        "val_accuracy": float((ensemble.combine_logits(val_logits).argmax(-1) == val_y).float().mean()),
        "vote_test_accuracy": float((majority_vote(test_logits, weights).argmax(-1) == test_y).float().mean()),
        "members_val_accuracy": member_accuracies(val_logits, val_y),
        "members_test_accuracy": member_test,
        "best_member_test_accuracy": max(member_test),
        "weights": weights.tolist(), "combine": combine, "weighting": weighting, "members": len(members),
    }
    if fitted is not None:
        metrics["epochs"] = len(fitted.epochs)
    if fitted is not None:
        _save_members(ctx, options, members, specs, dataset, test.classes, metrics["members_val_accuracy"], member_test,
                      trained_on)
    if all(s["id"] for s in specs):  # on a torchrun job's other processes the members were not saved
        metrics["training_data"] = training_data(ctx, options, None, dataset=dataset, parents=[s["id"] for s in specs])
    model_id = ctx.save(ensemble, backbone=BACKBONE,
                        config={"members": specs, "combine": combine, "weights": weights.tolist()},
                        dataset=dataset, classes=test.classes, metrics=metrics, parents=[s["id"] for s in specs],
                        options=options, name=options["name"], key="ensemble")
    if model_id is None:  # not the main process of a torchrun job: it saved nothing
        return StrategyResult(metrics=metrics)
    for k, (spec, acc) in enumerate(zip(specs, member_test)):
        ctx.log(f"ensemble: member {k} ({spec['id']}) test accuracy {acc:.4f}")
    ctx.log(f"ensemble: test accuracy {metrics['test_accuracy']:.4f} (best member "
            f"{metrics['best_member_test_accuracy']:.4f})")
    return StrategyResult(metrics=metrics, models=[s["id"] for s in specs if fitted is not None] + [model_id])


ENSEMBLE = Strategy(
    name="ensemble",
    description="combine K models (stored, or trained together as one batched model) into one ensemble model",
    options=(
        Option("members", list, None, "stored models to combine (recipe steps, store IDs, prefixes or names); "
               "without them, --num-members models of --backbone are trained together (on digits unless --dataset)",
               ref=True),
        Option("num_members", int, 4, "members to train together (without --members)", check=positive),
        *backbone_options(default=None, what="members trained together"),
        Option("combine", str, "probs", "how outputs combine: average the logits, the probabilities (probs and "
               "log_probs average the same; the ensemble outputs their log), or a majority vote", choices=COMBINES),
        Option("weighting", str, "uniform", "member weights: uniform, proportional to validation accuracy, or "
               "learned on the validation split", choices=WEIGHTINGS),
        augment_option(extra=". For members trained here (--backbone)"),
        *data_options(inherit_from="first member"),
        *train_options(),
        NAME_OPTION,
    ),
    run=run,
    examples=("reuse run ensemble --backbone small-cnn --num-members 4 --epochs 5",
              "reuse run ensemble --members digits-0-4 digits-0-4-b --weighting learned"),
)
