"""What the built-in strategies share: the data and training options, loading a dataset (class
subset, label budget), training through the engine, and saving the product with its lineage.

Third-party strategies may use these too (the example plugin's attention transfer does).
"""
from __future__ import annotations

import json

import torch
from torch.utils.data import Dataset

from reuse_core.strategy import REQUIRED, Option, StrategyResult, non_negative, positive


def _parses(parse):
    """An option check that reports what ``parse`` finds wrong with the value."""
    def check(values) -> str | None:
        try:
            parse(values)
        except ValueError as e:
            return str(e)
        return None
    return check


def data_options(*, classes_help: str = "class indices to train on, e.g. 0 1 2 or 0-4 (default: all)",
                 inherit_from: str = "",
                 budget_help: str = "labelled training examples per class (default: all of them)") -> tuple[Option, ...]:
    """``inherit_from``: the model whose dataset is the default (else the embedded digits)."""
    dataset_help = "registered dataset (`reuse datasets` lists them); default: "
    dataset_help += f"the {inherit_from}'s" if inherit_from else "digits"
    return (
        Option("dataset", str, None if inherit_from else "digits", dataset_help),
        Option("classes", list, None, classes_help, check=_parses(parse_classes)),
        Option("label_budget", int, None, budget_help, check=positive),
        Option("data_root", str, None, "folder the dataset reads from or downloads to (datasets that need one)"),
    )


def train_options(*, epochs: int = 10, lr: float = 0.05, optimizer: str = "sgd",
                  batch_size: int = 64) -> tuple[Option, ...]:
    return (
        Option("epochs", int, epochs, "training epochs", check=positive),
        Option("batch_size", int, batch_size, "examples per batch", check=positive),
        Option("lr", float, lr, "learning rate", check=positive),
        Option("optimizer", str, optimizer, "optimizer", choices=("sgd", "adam", "adamw")),
        Option("momentum", float, 0.9, "SGD momentum (0: plain SGD)", check=non_negative),
        Option("weight_decay", float, 5e-4, "weight decay", check=non_negative),
        Option("schedule", str, "cosine", "learning-rate schedule", choices=("constant", "step", "cosine")),
        Option("warmup_epochs", float, 0.0, "epochs of linear learning-rate warm-up", check=non_negative),
        Option("seed", int, 0, "seed of the data split, label budget, initialisation and data order"),
    )


def backbone_options(prefix: str = "", *, default=REQUIRED, what: str = "model") -> tuple[Option, ...]:
    return (
        Option(f"{prefix}backbone", str, default, f"registered backbone of the {what} (`reuse backbones` lists them)"),
        Option(f"{prefix}backbone_config", list, None,
               "backbone settings as KEY=VALUE, e.g. hidden=[64] (values are read as JSON where they parse)", check=_parses(parse_config)),
    )


NAME_OPTION = Option("name", str, None, "a name for the saved model in the store (default: none; models are found by ID)")


def parse_classes(values: list[str] | None) -> list[int] | None:
    """``["0-4", "7"]`` -> ``[0, 1, 2, 3, 4, 7]``; None stays None (all classes)."""
    if values is None:
        return None
    out: list[int] = []
    for v in values:
        lo, sep, hi = v.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(v)])
        except ValueError:
            raise ValueError(f"expected class indices or ranges like 0-4, got {v!r}") from None
    if len(set(out)) != len(out):
        raise ValueError(f"a class is listed twice in {values}")
    if not out:
        raise ValueError("no class given")
    return out


def parse_config(values: list[str] | None) -> dict:
    """``["width=16", "hidden=[64, 32]", "norm=batch"]`` -> ``{"width": 16, "hidden": [64, 32], "norm": "batch"}``:
    a value is read as JSON where it parses (numbers, true/false, lists), else kept as a string."""
    out: dict = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


class Subset(Dataset):
    """Some examples of a dataset, keeping the dataset contract's attributes."""

    def __init__(self, data: Dataset, indices: list[int]):
        self.data, self.indices = data, list(indices)
        self.classes, self.in_channels, self.input_size = data.classes, data.in_channels, data.input_size
        self.targets = [data.targets[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.data[self.indices[i]]


def budget_indices(targets: list[int], per_class: int, seed: int) -> list[int]:
    """``per_class`` examples of each class (all of a class that has fewer), drawn with ``seed``:
    the same draw for every strategy given the same data and seed, so baselines see the same labels."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    picked = []
    for c in sorted(by_class):
        members = by_class[c]
        order = torch.randperm(len(members), generator=g).tolist()
        picked.extend(members[j] for j in order[:per_class])
    return sorted(picked)


def load_splits(options: dict, *, dataset: str | None = None,
                classes: list[int] | None = None) -> tuple[Dataset, Dataset, Dataset]:
    """(train, val, test) of the options' dataset and classes (or the ones given); the training split
    cut to ``label_budget`` examples per class when set."""
    from reuse_core import data

    name = dataset or options["dataset"]
    kw = {"seed": options["seed"], "classes": classes if classes is not None else parse_classes(options["classes"])}
    if options.get("data_root"):
        kw["root"] = options["data_root"]
    train, val, test = (data.load(name, split=s, **kw) for s in ("train", "val", "test"))
    if options.get("label_budget"):
        train = Subset(train, budget_indices(train.targets, options["label_budget"], options["seed"]))
    return train, val, test


def build_model(options: dict, data, prefix: str = ""):
    """(a fresh ``{prefix}backbone`` for ``data``'s classes and channels, its stored config); the
    initial weights follow the seed."""
    from reuse_core import backbone

    import inspect

    from reuse_core import plugins

    config = {"in_channels": data.in_channels, **parse_config(options[f"{prefix}backbone_config"])}
    # Backbones sized for their input (seed-cnn, mlp) take it from the data unless the config says.
    height, width = data.input_size
    factory = plugins.backbones().get(options[f"{prefix}backbone"])
    if height == width and "input_size" in inspect.signature(factory).parameters:
        config.setdefault("input_size", height)
    torch.manual_seed(options["seed"])
    return backbone.build(options[f"{prefix}backbone"], len(data.classes), **config), config


def train_config(ctx, options: dict, **overrides):
    from reuse_core.engine import TrainConfig

    keys = ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "schedule", "warmup_epochs", "seed")
    return TrainConfig(**{k: options[k] for k in keys}, progress=not ctx.quiet, **overrides)


def fit(ctx, model, train, val, options: dict, *, loss_fn=None, **config):
    """Train through the engine in the run directory, with the run's hooks; resumes when the run does."""
    from reuse_core import engine

    kw = {"loss_fn": loss_fn} if loss_fn is not None else {}
    return engine.fit(model, train, val, config=train_config(ctx, options, **config), run_dir=ctx.run_dir,
                      hooks=ctx.hooks, strategy=ctx.strategy, resume=ctx.resume, device=ctx.device,
                      options=options, **kw)


def save(ctx, model, *, backbone: str, config: dict, dataset: str, classes: list[str], parents: list[str],
         options: dict, fitted, test) -> StrategyResult:
    """Evaluate on the test split, save to the store with lineage, and return the run's result.

    A resumed run that had already saved its model (``model.json`` in the run directory) returns
    that model instead of saving a second copy.
    """
    from reuse_core import engine
    from reuse_core.run import is_main_process, read_json, write_json

    test_metrics = engine.evaluate(model, test, ctx.device)
    metrics = {
        "test_accuracy": test_metrics["accuracy"], "test_loss": test_metrics["loss"],
        "val_accuracy": fitted.last_val_accuracy, "best_val_accuracy": fitted.best_val_accuracy,
        "epochs": len(fitted.epochs), "train_examples": fitted.epochs[-1]["samples"] if fitted.epochs else 0,
    }
    saved = ctx.run_dir / "model.json"
    if ctx.resume and (done := read_json(saved)) is not None:
        return StrategyResult(metrics=metrics, models=[done["id"]])
    if not is_main_process():
        return StrategyResult(metrics=metrics)
    record = ctx.store.save(
        model.state_dict(), backbone=backbone, config=config, dataset=dataset, classes=list(classes),
        metrics=metrics, parents=parents, strategy=ctx.strategy, options=options, name=options.get("name"),
    )
    write_json(saved, {"id": record.id})
    ctx.log(f"{ctx.strategy}: saved model {record.id} (test accuracy {metrics['test_accuracy']:.4f})")
    return StrategyResult(metrics=metrics, models=[record.id])
