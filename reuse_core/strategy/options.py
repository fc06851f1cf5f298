"""The option groups the built-in strategies share, and the parsers of their values.

Torch-free, like the schema: ``reuse run STRATEGY --help`` is built from these. A strategy puts
``*data_options()``, ``*train_options()`` and the others into its schema; the building blocks in
:mod:`reuse_core.strategy.blocks` read the resolved values by these names.
"""
from __future__ import annotations

import json

from reuse_core.strategy.schema import REQUIRED, Option, non_negative, positive

# The training options, as TrainConfig's fields of the same names.
TRAIN_KEYS = ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "schedule", "warmup_epochs", "seed")


def parse_classes(values: list[str] | None) -> list[int] | None:
    """``["0-4", "7"]`` -> ``[0, 1, 2, 3, 4, 7]``; None stays None (all classes)."""
    if values is None:
        return None
    out: list[int] = []
    for v in values:
        lo, sep, hi = v.partition("-")
        try:
            first, last = (int(lo), int(hi)) if sep else (int(v), int(v))
        except ValueError:
            raise ValueError(f"expected class indices or ranges like 0-4, got {v!r}") from None
        if last < first:
            raise ValueError(f"the range {v!r} is reversed (write {last}-{first})")
        out.extend(range(first, last + 1))
    if len(set(out)) != len(out):
        raise ValueError(f"a class is listed twice in {values}")
    if not out:
        raise ValueError("no class given")
    return out


def parse_config(values: list[str] | None) -> dict:
    """``["width=16", "hidden=[64, 32]", "norm=batch"]`` -> ``{"width": 16, "hidden": [64, 32], "norm": "batch"}``:
    a value is read as JSON where it parses (numbers, true/false, lists), else kept as a string; a value
    that starts like a JSON list, object or string but does not parse is refused."""
    out: dict = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError as e:
            if raw.lstrip()[:1] in ('[', '{', '"'):
                raise ValueError(f"the value of {key} is not valid JSON ({e.msg} at character {e.pos}): {raw!r}") from None
            out[key] = raw
    return out


def parses(parse):
    """An option check that reports what ``parse`` finds wrong with the value."""
    def check(values) -> str | None:
        try:
            parse(values)
        except ValueError as e:
            return str(e)
        return None
    return check


def data_options(*, classes_help: str = "class indices to train on, e.g. 0 1 2 or 0-4 (default: all)",
                 inherit_from: str = "", label_budget: bool = True,
                 budget_help: str = "labelled training examples per class (default: all of them)") -> tuple[Option, ...]:
    """dataset, classes, label_budget (unless ``label_budget=False``), data_root and dataset_config.
    ``inherit_from``: the model whose dataset is the default (else the embedded digits)."""
    dataset_help = "registered dataset (`reuse datasets` lists them); default: "
    dataset_help += f"the {inherit_from}'s" if inherit_from else "digits"
    return (
        Option("dataset", str, None if inherit_from else "digits", dataset_help),
        Option("classes", list, None, classes_help, check=parses(parse_classes)),
        *([Option("label_budget", int, None, budget_help, check=positive)] if label_budget else []),
        Option("data_root", str, None, "folder the dataset reads from or downloads to (datasets that need one)"),
        Option("dataset_config", list, None, "dataset settings as KEY=VALUE, passed to the dataset provider, e.g. "
               "image_size=64 for imagefolder or label_mode=coarse for cifar100 (values are read as JSON where "
               "they parse)", check=parses(parse_config)),
    )


def train_options(*, epochs: int = 10, lr: float = 0.05, optimizer: str = "sgd", batch_size: int = 64,
                  weight_decay: float = 5e-4) -> tuple[Option, ...]:
    """The engine's training settings (:data:`TRAIN_KEYS`), with these defaults."""
    return (
        Option("epochs", int, epochs, "training epochs", check=positive),
        Option("batch_size", int, batch_size, "examples per batch", check=positive),
        Option("lr", float, lr, "learning rate", check=positive),
        Option("optimizer", str, optimizer, "optimizer", choices=("sgd", "adam", "adamw")),
        Option("momentum", float, 0.9, "SGD momentum (0: plain SGD)", check=non_negative),
        Option("weight_decay", float, weight_decay, "weight decay", check=non_negative),
        Option("schedule", str, "cosine", "learning-rate schedule", choices=("constant", "step", "cosine")),
        Option("warmup_epochs", float, 0.0, "epochs of linear learning-rate warm-up", check=non_negative),
        Option("seed", int, 0, "seed of the data split, label budget, initialisation and data order"),
    )


def backbone_options(prefix: str = "", *, default=REQUIRED, what: str = "model") -> tuple[Option, ...]:
    """``{prefix}backbone`` and ``{prefix}backbone_config``, as :func:`~reuse_core.strategy.blocks.build_model` reads them."""
    return (
        Option(f"{prefix}backbone", str, default, f"registered backbone of the {what} (`reuse backbones` lists them)"),
        Option(f"{prefix}backbone_config", list, None,
               "backbone settings as KEY=VALUE, e.g. hidden=[64] (values are read as JSON where they parse)",
               check=parses(parse_config)),
    )


# augment's strengths (those of reuse_core.data.augment.pipeline, which needs torch) and what each does
_AUGMENT_HELP = {
    "none": "none",
    "light": "light (grey images: small shifts, rotations and scales; colour: padded crops and flips)",
    "strong": "strong (grey: larger rotations and scales, shear and pixel noise; colour: resized crops, flips, "
              "colour jitter and greying)",
}


def augment_option(default: str = "none", *, choices: tuple[str, ...] = tuple(_AUGMENT_HELP),
                   extra: str = "") -> Option:
    """``augment``: the built-in random augmentation of the training images, drawn per example
    (:func:`~reuse_core.strategy.blocks.augmentation`)."""
    return Option("augment", str, default, "random augmentation of the training images, drawn for each example: "
                  + "; ".join(_AUGMENT_HELP[c] for c in choices) + f". Grey images are never flipped{extra}",
                  choices=choices)


TEACHER_OPTION = Option("teacher", str, help="the teacher: a recipe step, or a store ID, ID prefix or name", ref=True)
def _block_pairs(values: list[str]) -> str | None:
    bad = [v for v in values if v.count(":") != 1 or "" in v.split(":")]
    return f"expected teacher_block:student_block items, got {bad}" if bad else None


PAIRS_OPTION = Option("pairs", list, None, "teacher_block:student_block pairs whose features are matched (default: "
                      "the last k spatial blocks of each, in order)", check=_block_pairs)
def _model_name(value: str) -> str | None:
    from reuse_core.store import StoreError, check_name  # the store's own rule, checked before any training

    try:
        check_name(value)
    except StoreError as e:
        return str(e)
    return None


NAME_OPTION = Option("name", str, None, "a name for the saved model in the store (default: none; models are found by ID)",
                     check=_model_name)
